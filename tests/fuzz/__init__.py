"""Fuzzers: the frame layer after the handshake (``make fuzz``; a bounded run is in
tests/unit/test_frame_fuzz.py)."""

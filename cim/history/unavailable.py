"""The one error the timelines give callers when they cannot serve them now."""

from __future__ import annotations

__all__ = ["TimelineUnavailable"]


class TimelineUnavailable(Exception):
    """The timeline cannot take or read messages now (the database is down or behind,
    the journal cannot be written). ``cim.history.timeline`` names it for callers."""

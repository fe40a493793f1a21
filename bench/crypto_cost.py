"""Per-frame cost of sealing and opening small frames, for both cipher suites.

Run ``python -m bench.crypto_cost``. The numbers behind ``docs/crypto.md``: the
node's per-frame crypto budget is 2 µs for a 120-byte frame, and this shows which
library and which construction stays under it. pycryptodome is measured too when
it is importable, for comparison only (cim does not depend on it).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import platform
import struct
import time
from collections.abc import Callable

import cryptography
from cryptography.hazmat.decrepit.ciphers.algorithms import ARC4
from cryptography.hazmat.primitives.ciphers import Cipher
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from cim.protocols.crypto import KNOWN_SUITES, session_ciphers

Row = tuple[str, str, float]


def best_of(repeats: int, frames: int, run: Callable[[int], object]) -> float:
    """Microseconds per frame: the fastest of several runs (least disturbed by noise)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter_ns()
        run(frames)
        best = min(best, (time.perf_counter_ns() - started) / frames / 1000)
    return best


def measure_suite(suite: str, size: int, frames: int, repeats: int) -> list[Row]:
    plaintext = b"\x0c" + os.urandom(size - 1)
    secret, client_nonce, server_nonce = os.urandom(32), os.urandom(16), os.urandom(16)
    fingerprint = hashlib.sha256(b"bench").digest()
    # Fresh cipher pairs per run: the counters must line up between seal and open.
    bodies: list[bytes] = []
    seal_times: list[float] = []
    open_times: list[float] = []
    for _ in range(repeats):
        sealer, _ = session_ciphers(
            suite, secret, client_nonce, server_nonce, fingerprint, KNOWN_SUITES, "client"
        )
        _, opener = session_ciphers(
            suite, secret, client_nonce, server_nonce, fingerprint, KNOWN_SUITES, "node"
        )
        seal = sealer.seal
        open_ = opener.open
        started = time.perf_counter_ns()
        bodies = [seal(plaintext) for _ in range(frames)]
        seal_times.append((time.perf_counter_ns() - started) / frames / 1000)
        started = time.perf_counter_ns()
        for body in bodies:
            open_(body)
        open_times.append((time.perf_counter_ns() - started) / frames / 1000)
    library = f"cryptography {cryptography.__version__}"
    return [
        (f"{suite} seal (cim)", library, min(seal_times)),
        (f"{suite} open (cim)", library, min(open_times)),
        (f"{suite} seal+open (cim)", library, min(seal_times) + min(open_times)),
    ]


def measure_primitives(size: int, frames: int, repeats: int) -> list[Row]:
    """The building blocks alone, to show where a frame's time goes."""
    plaintext = os.urandom(size)
    key = os.urandom(32)
    library = f"cryptography {cryptography.__version__}"
    rows: list[Row] = []

    rc4 = Cipher(ARC4(key), mode=None).encryptor().update

    def rc4_only(n: int) -> None:
        for _ in range(n):
            rc4(plaintext)

    rows.append(("RC4 alone", library, best_of(repeats, frames, rc4_only)))

    inner = hashlib.sha256(key.ljust(64, b"\0").translate(bytes(x ^ 0x36 for x in range(256))))
    outer = hashlib.sha256(key.ljust(64, b"\0").translate(bytes(x ^ 0x5C for x in range(256))))
    counter = struct.pack(">Q", 7)

    def hmac_precomputed(n: int) -> None:
        for _ in range(n):
            i = inner.copy()
            i.update(counter)
            i.update(plaintext)
            o = outer.copy()
            o.update(i.digest())
            o.digest()

    def hmac_digest(n: int) -> None:
        for _ in range(n):
            hmac.digest(key, counter + plaintext, "sha256")

    rows.append(
        ("HMAC-SHA256, precomputed states", "hashlib", best_of(repeats, frames, hmac_precomputed))
    )
    rows.append(("HMAC-SHA256, hmac.digest", "hmac", best_of(repeats, frames, hmac_digest)))

    aead = ChaCha20Poly1305(key)
    nonce = bytes(12)

    def chacha_only(n: int) -> None:
        for _ in range(n):
            aead.encrypt(nonce, plaintext, None)

    rows.append(("ChaCha20-Poly1305 encrypt alone", library, best_of(repeats, frames, chacha_only)))
    return rows


def measure_pycryptodome(size: int, frames: int, repeats: int) -> list[Row]:
    """The same constructions with pycryptodome, if it is installed."""
    try:
        import Crypto
        from Crypto.Cipher import ARC4 as DomeARC4
        from Crypto.Cipher import ChaCha20_Poly1305
        from Crypto.Hash import HMAC, SHA256
    except ImportError:
        return []
    library = f"pycryptodome {Crypto.__version__}"
    plaintext = os.urandom(size)
    key = os.urandom(32)
    counter = struct.pack(">Q", 7)
    rows: list[Row] = []

    rc4 = DomeARC4.new(key, drop=3072).encrypt

    def rc4_only(n: int) -> None:
        for _ in range(n):
            rc4(plaintext)

    def rc4_hmac(n: int) -> None:
        for _ in range(n):
            ciphertext = rc4(plaintext)
            HMAC.new(key, counter + ciphertext, digestmod=SHA256).digest()

    def chacha_per_frame(n: int) -> None:
        # pycryptodome's AEAD objects are single-use: one object per frame.
        for index in range(n):
            cipher = ChaCha20_Poly1305.new(key=key, nonce=struct.pack(">IQ", 1, index))
            cipher.encrypt_and_digest(plaintext)

    rows.append(("RC4 alone", library, best_of(repeats, frames, rc4_only)))
    rows.append(("RC4 + HMAC-SHA256 seal", library, best_of(repeats, frames, rc4_hmac)))
    rows.append(
        ("ChaCha20-Poly1305 seal (new object)", library, best_of(repeats, frames, chacha_per_frame))
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=120, help="plaintext bytes per frame")
    parser.add_argument("--frames", type=int, default=100_000, help="frames per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs; the best is kept")
    args = parser.parse_args(argv)
    if args.size < 1 or args.frames < 1 or args.repeats < 1:
        parser.error("--size, --frames and --repeats must be positive")

    rows: list[Row] = []
    for suite in KNOWN_SUITES:
        rows.extend(measure_suite(suite, args.size, args.frames, args.repeats))
    rows.extend(measure_primitives(args.size, args.frames, args.repeats))
    dome = measure_pycryptodome(args.size, args.frames, args.repeats)
    rows.extend(dome)

    print(
        f"{args.size}-byte frames, best of {args.repeats} x {args.frames} frames; "
        f"Python {platform.python_version()} on {platform.machine()}"
    )
    width = max(len(name) for name, _, _ in rows)
    library_width = max(len(library) for _, library, _ in rows)
    print(f"{'what':<{width}}  {'library':<{library_width}}  µs/frame")
    for name, library, micros in rows:
        print(f"{name:<{width}}  {library:<{library_width}}  {micros:8.2f}")
    if not dome:
        print("(pycryptodome is not installed; its rows are skipped)")


if __name__ == "__main__":
    main()

"""Handing memory freed in the middle of the heap back to the operating system.

glibc's allocator returns freed memory to the system only from the top of its heap.
A burst of handshakes (receive buffers, RSA and cipher contexts, protobuf arenas) frees
memory in the middle, between the small objects each connection keeps, and that memory
stays in the process's RSS until reused: measured on 15,000 idle connections, about
1.3 KiB per connection, a third of what each costs. ``malloc_trim(0)`` gives those
pages back (madvise), and costs about 2 ms on a 150 MB heap, so the node calls it
every ``[node] heap_trim_interval``. On a C library without ``malloc_trim`` (musl,
macOS) there is nothing to do and nothing is scheduled.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = ["HeapTrimmer", "find_malloc_trim", "freeze_startup_heap", "map_large_allocations"]

_M_MMAP_THRESHOLD = -3


def freeze_startup_heap() -> None:
    """Leave what the node built at start out of every later garbage collection.

    CPython's full collection walks every tracked object, and a started node has a
    few hundred thousand of them (modules, classes, functions, protobuf descriptors,
    the SQLAlchemy metadata) that live as long as the process. Walking them took
    tens of milliseconds per full collection, every few seconds under load: the p99
    latency of every message in flight at that moment (measured: 3.6 ms -> 97 ms at
    2,000 msg/s once the batch writer added two objects per archived message and so
    made full collections more frequent). ``gc.freeze`` moves them to the permanent
    generation, after one collection so no garbage is frozen with them. Called once,
    by the daemon under twistd, when the node has started (never in tests, which
    start many nodes in one process and must be able to collect them).
    """
    gc.collect()
    gc.freeze()


def find_malloc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has no such call."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int

    def trim() -> int:
        return int(function(0))

    return trim


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """Give every allocation of ``threshold`` bytes or more its own mapping (glibc).

    Such blocks go back to the system the moment they are freed. By default glibc
    raises this threshold as large blocks are freed, and then serves them from the
    per-thread arenas, which keep what is freed: thumbnails decoded one after another
    on the file pool's threads (100 MB each) took the node's RSS to twice what was
    decoding at any moment. Returns False where the C library has no ``mallopt``.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


class HeapTrimmer:
    """Calls ``trim`` every ``interval`` seconds while started."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        trim: Callable[[], int] | None = None,
    ) -> None:
        self._trim = trim if trim is not None else find_malloc_trim()
        self._loop = LoopingCall(self._run)
        self._loop.clock = clock
        self.interval = interval
        self.runs = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def start(self) -> None:
        if self._trim is None or self.interval <= 0 or self._loop.running:
            return
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _run(self) -> None:
        assert self._trim is not None
        try:
            self._trim()
        except Exception:
            self.log.failure("malloc_trim failed; not trying again")
            self.stop()
            return
        self.runs += 1

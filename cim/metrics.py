"""Counters the node keeps while it works, and their Prometheus rendering.

The per-frame path only increments plain Python ints and list slots: a
prometheus_client Counter takes a lock on every ``inc()``, which would cost more
than the frame's encryption. The numbers are turned into metric families only when
someone scrapes ``/metrics``.
"""

from __future__ import annotations

import gc
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from cim.protocols import cim_pb2


def _frame_type_names() -> dict[int, str]:
    return {number: name.lower() for name, number in cim_pb2.FrameType.items()}


# Seconds from the node taking a msg:R to the receiver's ack:R.
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Seconds a transaction waits for a database thread.
DB_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
# Seconds from an HTTP request's arrival (headers and body read) to its answer's last byte;
# a login runs the password KDF, a download streams a whole file.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


class Histogram:
    """A Prometheus-style histogram kept as plain ints; rendered at scrape time.

    ``observe`` is safe from worker threads (the database pool) through a lock only
    when ``threaded`` is set; on the reactor thread it takes no lock.
    """

    def __init__(self, buckets: Sequence[float], threaded: bool = False) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self._lock = threading.Lock() if threaded else None

    def observe(self, value: float) -> None:
        value = max(value, 0.0)
        slot = bisect_left(self.bounds, value)
        if self._lock is None:
            self.counts[slot] += 1
            self.sum += value
        else:
            with self._lock:
                self.counts[slot] += 1
                self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """The buckets as Prometheus exposes them: ``(le, count at or below it)``."""
        total = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return buckets

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, unit="seconds")
        family.add_metric([], self.cumulative(), self.sum)
        return family


HTTP_LABELS = ["service", "method", "route", "status"]


class HttpRequests:
    """The requests the node's HTTP services answered: how many and how long each took.

    Kept per service (router, logic, files, admin), method, route template (never the
    raw path: one series per post id or file id would grow without bound) and status,
    as plain ints on the reactor thread; rendered at scrape time.
    """

    def __init__(self) -> None:
        self._seconds: dict[tuple[str, str, str, str], Histogram] = {}

    def observe(self, service: str, method: str, route: str, status: str, seconds: float) -> None:
        key = (service, method, route, status)
        histogram = self._seconds.get(key)
        if histogram is None:
            histogram = self._seconds[key] = Histogram(HTTP_BUCKETS)
        histogram.observe(seconds)

    def count(self, service: str, method: str, route: str, status: str) -> int:
        histogram = self._seconds.get((service, method, route, status))
        return 0 if histogram is None else histogram.count

    def families(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "cim_http_requests",
            "HTTP requests answered, by service, method, route template and status.",
            labels=HTTP_LABELS,
        )
        seconds = HistogramMetricFamily(
            "cim_http_request_duration",
            "Seconds from an HTTP request's arrival to the last byte of its answer.",
            labels=HTTP_LABELS,
            unit="seconds",
        )
        for key, histogram in sorted(self._seconds.items()):
            requests.add_metric(list(key), histogram.count)
            seconds.add_metric(list(key), histogram.cumulative(), histogram.sum)
        yield requests
        yield seconds


# Seconds from a message's append to a push provider's acceptance (retries included).
PUSH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


class PushMetrics:
    """Pushes by provider and outcome, the queue's depth, the latency (cim.push)."""

    def __init__(self) -> None:
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.latency = Histogram(PUSH_BUCKETS)
        self.queue_depth: Callable[[], int | None] = lambda: None

    def count(self, provider: str, outcome: str) -> None:
        self.outcomes[(provider, outcome)] += 1

    def families(self) -> Iterator[Metric]:
        depth = self.queue_depth()
        if depth is None:
            return
        pushes = CounterMetricFamily(
            "cim_pushes", "Pushes by provider and outcome.", labels=["provider", "outcome"]
        )
        for (provider, outcome), count in sorted(self.outcomes.items()):
            pushes.add_metric([provider, outcome], count)
        yield pushes
        gauge = GaugeMetricFamily(
            "cim_push_queue_depth", "Pushes this node holds: waiting, in flight or to retry."
        )
        gauge.add_metric([], depth)
        yield gauge
        yield self.latency.family(
            "cim_push_latency",
            "Seconds from a message's append to the push provider's acceptance.",
        )


# Seconds between two turns of the reactor's lag probe: anything well past the probe's
# interval is a stall (a long callback, a full garbage collection, the GIL held by a thread).
REACTOR_GAP_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ReactorLag:
    """How long the reactor went without running a timer: its longest stalls.

    A stall delays every message in flight at that moment, so a p99 of tens of
    milliseconds at a modest rate comes from them, not from the per-message cost. A
    LoopingCall every ``interval`` notes the wall time between its own runs: while the
    reactor is free that is the interval; a callback (or a thread holding the GIL)
    that keeps it busy for S seconds makes one gap of about S. Histogram and maximum
    are plain numbers rendered at scrape time, so a scraper (the benchmark) can tell
    how many gaps past 10 ms a window had from two scrapes. Off unless
    ``[node] lag_probe_interval`` is set: it wakes an idle node ``1/interval`` times a
    second.
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        cpu_time: Callable[[], float] = time.process_time,
    ) -> None:
        self.interval = interval
        self.gaps = Histogram(REACTOR_GAP_BUCKETS)
        self.longest = 0.0
        self.gap_cpu = Histogram(REACTOR_GAP_BUCKETS)
        """The process's CPU time within each gap: a long gap with little CPU in it is
        the process waiting (descheduled on a busy machine, or a blocking call), one
        with as much CPU as wall time is its own work (a callback, a collection, a
        thread holding the GIL)."""
        self.longest_cpu = 0.0
        self._clock = clock
        self._cpu_time = cpu_time
        self._last: float | None = None
        self._last_cpu = 0.0
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock

    def start(self) -> None:
        if self.interval > 0 and not self._loop.running:
            self._last = None
            self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        now, cpu = self._clock.seconds(), self._cpu_time()
        last, self._last = self._last, now
        last_cpu, self._last_cpu = self._last_cpu, cpu
        if last is None:
            return
        gap, used = now - last, cpu - last_cpu
        self.gaps.observe(gap)
        self.gap_cpu.observe(used)
        if gap > self.longest:
            self.longest = gap
        if used > self.longest_cpu:
            self.longest_cpu = used

    def families(self) -> Iterator[Metric]:
        if self.interval <= 0:
            return
        yield from _with_longest(
            self.gaps,
            "cim_reactor_gap",
            f"Seconds between two runs of the reactor's lag probe (every {self.interval:g} s); "
            "past the interval, the reactor was held.",
            self.longest,
            "The longest gap between two runs of the lag probe since the node started.",
        )
        yield from _with_longest(
            self.gap_cpu,
            "cim_reactor_gap_cpu",
            "CPU seconds the process used within each gap of the lag probe "
            "(all threads: its own work, not waiting).",
            self.longest_cpu,
            "The most CPU the process used within one gap of the lag probe since it started.",
        )


def _with_longest(
    histogram: Histogram, name: str, documentation: str, longest: float, longest_doc: str
) -> Iterator[Metric]:
    """A histogram of seconds and, as ``<name>_max_seconds``, the longest it has seen
    (a histogram bounds it only by a bucket)."""
    yield histogram.family(name, documentation)
    gauge = GaugeMetricFamily(f"{name}_max", longest_doc, unit="seconds")
    gauge.add_metric([], longest)
    yield gauge


REACTOR_HOLD_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class ReactorHolds:
    """How long the reactor held on between two of its polls: a turn's work, and any
    wait for the core or the GIL inside it, timed at the poll itself
    (``cim.reactor.dispatch_without_log_context``).

    The lag probe (``ReactorLag``) sees a hold only as its own timer coming late, and a
    late ``LoopingCall`` goes back on its grid, so a gap it records is the hold plus up
    to one interval; this is the hold. Only holds of at least ``FLOOR`` are counted: a
    busy node turns thousands of times a second, each far shorter, and a histogram
    update per turn would cost more than the timing itself.
    """

    FLOOR = 0.001

    def __init__(self) -> None:
        self.holds = Histogram(REACTOR_HOLD_BUCKETS)
        self.longest = 0.0

    def observe(self, seconds: float) -> None:
        self.holds.observe(seconds)
        if seconds > self.longest:
            self.longest = seconds

    def families(self) -> Iterator[Metric]:
        yield from _with_longest(
            self.holds,
            "cim_reactor_hold",
            f"Seconds the reactor went from one poll to the next, for turns of at least "
            f"{self.FLOOR:g} s: its work, and any wait for the core or the GIL within it.",
            self.longest,
            "The longest the reactor went from one poll to the next since the node started.",
        )


class CollectorPauses:
    """The garbage collector's pauses, by generation: what a stall of the reactor was.

    CPython stops the process for each collection; a full one (generation 2) walks
    every object made since start-up (``cim.heap.freeze_startup_heap`` left the rest
    out) and is the longest, tens of milliseconds on a busy node. With the lag probe
    (``ReactorLag``) it tells a scraper how many of a window's stalls were
    collections. ``gc.callbacks`` calls ``observe`` at each collection's start and
    stop; the daemon installs it with the lag probe (``[node] lag_probe_interval``).
    """

    def __init__(self, timer: Callable[[], float] = time.perf_counter) -> None:
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self.full = Histogram(REACTOR_GAP_BUCKETS)
        """The full collections' pauses (generation 2)."""
        self._timer = timer
        self._started = 0.0
        self._installed = False

    def observe(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = self._timer()
            return
        pause = self._timer() - self._started
        generation = min(max(int(info.get("generation", 0)), 0), 2)
        self.collections[generation] += 1
        self.seconds[generation] += pause
        if pause > self.longest[generation]:
            self.longest[generation] = pause
        if generation == 2:
            self.full.observe(pause)

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self.observe)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self.observe)
            self._installed = False

    def families(self) -> Iterator[Metric]:
        count = CounterMetricFamily(
            "cim_gc_collections", "Garbage collections, by generation.", labels=["generation"]
        )
        spent = CounterMetricFamily(
            "cim_gc_pause_seconds",
            "Seconds the process stood still in garbage collections, by generation.",
            labels=["generation"],
        )
        longest = GaugeMetricFamily(
            "cim_gc_pause_max",
            "The longest garbage collection since the node started, by generation.",
            labels=["generation"],
            unit="seconds",
        )
        for generation in range(3):
            label = [str(generation)]
            count.add_metric(label, self.collections[generation])
            spent.add_metric(label, self.seconds[generation])
            longest.add_metric(label, self.longest[generation])
        yield count
        yield spent
        yield longest
        yield self.full.family(
            "cim_gc_full_pause", "Pauses of the full garbage collections (generation 2)."
        )


class NodeMetrics:
    """Plain counters for one daemon; every field is cheap to bump."""

    def __init__(self) -> None:
        self.connections_open = 0
        self.connections_total = 0
        self.websocket_open = 0
        """Of connections_open, those on the WebSocket gateway (cim.protocols.gateway)."""
        self.connections_refused: Counter[str] = Counter()
        self.handshakes_ok = 0
        self.handshake_failures: Counter[str] = Counter()
        # Indexed by the frame type byte: a list slot is the cheapest counter there is.
        self.frames_in = [0] * 256
        self.frames_out = [0] * 256
        self.bytes_in = 0
        self.bytes_out = 0
        self.heartbeats_in = 0
        self.heartbeats_out = 0
        self.heartbeat_timeouts = 0
        self.slow_readers_cut = 0
        """Connections cut over their outbound budget ([im] slow_reader_timeout)."""
        self.senders_paused = 0
        """Times a sender was paused for the node's queued bytes ([im] max_queued_bytes)."""
        self.frames_rejected: Counter[str] = Counter()
        self.frames_refused: Counter[str] = Counter()
        self.messages: Counter[str] = Counter()
        self.logins: Counter[str] = Counter()
        self.delivery_latency = Histogram(DELIVERY_BUCKETS)
        self.db_wait = Histogram(DB_WAIT_BUCKETS, threaded=True)
        self.http = HttpRequests()
        self.push = PushMetrics()
        self.reactor_lag: ReactorLag | None = None
        """Set by the daemon when [node] lag_probe_interval is on."""
        self.collector_pauses: CollectorPauses | None = None
        """Set by the daemon with the lag probe."""
        self.reactor_holds: ReactorHolds | None = None
        """Set by the daemon when its reactor times its holds (``cim.tap``)."""
        # Read at scrape time; the daemon points them at the switchboard and the
        # offline writer once those exist.
        self.connections_established: Callable[[], int] = lambda: 0
        self.offline_pending: Callable[[], int | None] = lambda: None


class NodeMetricsCollector(Collector):
    """Renders NodeMetrics as Prometheus families at scrape time."""

    def __init__(self, metrics: NodeMetrics, node_id: str) -> None:
        self._metrics = metrics
        self._node_id = node_id
        self._type_names = _frame_type_names()

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        gauge = GaugeMetricFamily(
            "cim_connections", "Client connections currently open.", labels=["node"]
        )
        gauge.add_metric([self._node_id], m.connections_open)
        yield gauge

        browsers = GaugeMetricFamily(
            "cim_websocket_connections",
            "Client connections open now on the WebSocket gateway (also in cim_connections).",
            labels=["node"],
        )
        browsers.add_metric([self._node_id], m.websocket_open)
        yield browsers

        established = min(m.connections_established(), m.connections_open)
        states = GaugeMetricFamily(
            "cim_connection_states",
            "Client connections currently open, by state.",
            labels=["state"],
        )
        states.add_metric(["handshaking"], max(m.connections_open - established, 0))
        states.add_metric(["established"], established)
        yield states

        accepted = CounterMetricFamily(
            "cim_connections_accepted", "Client connections accepted.", labels=["node"]
        )
        accepted.add_metric([self._node_id], m.connections_total)
        yield accepted

        refused = CounterMetricFamily(
            "cim_connections_refused", "Client connections refused, by reason.", labels=["reason"]
        )
        for reason, count in sorted(m.connections_refused.items()):
            refused.add_metric([reason], count)
        yield refused

        handshakes = CounterMetricFamily(
            "cim_handshakes", "Handshakes by outcome.", labels=["outcome", "reason"]
        )
        handshakes.add_metric(["ok", ""], m.handshakes_ok)
        for reason, count in sorted(m.handshake_failures.items()):
            handshakes.add_metric(["failed", reason], count)
        yield handshakes

        frames = CounterMetricFamily(
            "cim_frames", "Frames by direction and type.", labels=["direction", "type"]
        )
        for direction, counts in (("in", m.frames_in), ("out", m.frames_out)):
            for number, count in enumerate(counts):
                if count:
                    name = self._type_names.get(number, str(number))
                    frames.add_metric([direction, name], count)
        frames.add_metric(["in", "heartbeat"], m.heartbeats_in)
        frames.add_metric(["out", "heartbeat"], m.heartbeats_out)
        yield frames

        wire_bytes = CounterMetricFamily(
            "cim_wire_bytes", "Bytes on client connections.", labels=["direction"], unit="bytes"
        )
        wire_bytes.add_metric(["in"], m.bytes_in)
        wire_bytes.add_metric(["out"], m.bytes_out)
        yield wire_bytes

        rejected = CounterMetricFamily(
            "cim_frames_rejected",
            "Frames that closed their connection, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(m.frames_rejected.items()):
            rejected.add_metric([reason], count)
        yield rejected

        refused = CounterMetricFamily(
            "cim_frames_refused",
            "Frames answered BAD_REQUEST at the edge (connection kept), by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(m.frames_refused.items()):
            refused.add_metric([reason], count)
        yield refused

        timeouts = CounterMetricFamily("cim_heartbeat_timeouts", "Connections closed for silence.")
        timeouts.add_metric([], m.heartbeat_timeouts)
        yield timeouts

        slow = CounterMetricFamily(
            "cim_slow_readers_cut", "Connections cut over their outbound budget."
        )
        slow.add_metric([], m.slow_readers_cut)
        yield slow

        paused = CounterMetricFamily(
            "cim_senders_paused", "Times reading from a sender paused for queued bytes."
        )
        paused.add_metric([], m.senders_paused)
        yield paused

        messages = CounterMetricFamily(
            "cim_messages", "One-to-one messages by outcome.", labels=["outcome"]
        )
        for outcome, count in sorted(m.messages.items()):
            messages.add_metric([outcome], count)
        yield messages

        logins = CounterMetricFamily("cim_logins", "Router logins by outcome.", labels=["outcome"])
        for outcome, count in sorted(m.logins.items()):
            logins.add_metric([outcome], count)
        yield logins

        yield m.delivery_latency.family(
            "cim_delivery_latency",
            "Seconds from the node taking a one-to-one message to the receiver's ack.",
        )
        yield m.db_wait.family(
            "cim_database_pool_wait",
            "Seconds a database transaction waited for a pool thread.",
        )
        yield from m.http.families()
        yield from m.push.families()
        if m.reactor_lag is not None:
            yield from m.reactor_lag.families()
        if m.collector_pauses is not None:
            yield from m.collector_pauses.families()
        if m.reactor_holds is not None:
            yield from m.reactor_holds.families()

        pending = m.offline_pending()
        if pending is not None:
            offline = GaugeMetricFamily(
                "cim_offline_writer_pending",
                "Messages this node's timeline writer holds, not yet committed.",
            )
            offline.add_metric([], pending)
            yield offline

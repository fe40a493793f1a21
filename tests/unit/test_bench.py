"""The benchmark's instruments: hand-built frames are the protocol's, and the arithmetic.

The real run (a daemon and a worker process) is in tests/integration/test_bench.py.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from bench.clients import TEXT_SIZE, BenchConnection, varint
from bench.profiling import summarise_folded
from bench.push_outage import parse_push_metrics
from bench.scaling import markdown, per_unit, project, redis_delta
from bench.steady import (
    collections_between,
    holds_between,
    parse_collector,
    parse_reactor_gaps,
    stalls_between,
)
from bench.steady import figures as steady_figures
from bench.steps import percentiles, saturated_side
from bench.workers import split
from cim.metrics import (
    CollectorPauses,
    NodeMetrics,
    NodeMetricsCollector,
    ReactorHolds,
    ReactorLag,
)
from cim.protocols import cim_pb2


class _PlainSealer:
    def seal(self, plaintext: bytes) -> bytes:
        return plaintext

    def release(self) -> None:
        """Nothing to wipe: it holds no key."""


class FrameTests(SynchronousTestCase):
    def test_varint_matches_protobuf(self) -> None:
        for value in (1, 127, 128, 300, 2**32, 2**63 - 1):  # 0 is omitted by proto3
            self.assertEqual(
                b"\x08" + varint(value), cim_pb2.AckR(msg_id=value).SerializeToString()
            )

    def test_hand_built_msg_r_parses_as_a_message(self) -> None:
        conn = BenchConnection.__new__(BenchConnection)
        conn._sealer = _PlainSealer()
        conn.out = []
        conn.pending = {}
        conn.next_seq = 300
        conn.sent = 0
        conn.budget = -1
        conn.aim_at("bob")
        conn.queue_message(123456789)
        frame = conn.out[0]
        self.assertEqual(int.from_bytes(frame[:4], "big"), len(frame) - 4)
        self.assertEqual(frame[4], cim_pb2.MSG_R)
        message = cim_pb2.Message.FromString(frame[5:])
        self.assertEqual((message.to, message.client_seq), ("bob", 300))
        self.assertEqual(len(message.text), TEXT_SIZE)
        self.assertEqual(int(message.text[:20]), 123456789)
        self.assertEqual((conn.sent, list(conn.pending)), (1, [300]))

        conn.aim_at("abcdefgh", group=True)
        conn.queue_message(5)
        message = cim_pb2.Message.FromString(conn.out[1][5:])
        self.assertEqual((message.group, message.to, message.client_seq), ("abcdefgh", "", 301))


class ArithmeticTests(SynchronousTestCase):
    def test_split_covers_everything_once(self) -> None:
        self.assertEqual(split(10, 3), [(0, 4), (4, 3), (7, 3)])
        self.assertEqual(sum(count for _, count in split(15000, 4)), 15000)

    def test_percentiles_nearest_rank(self) -> None:
        result = percentiles(list(range(1000, 1001000, 1000)))
        self.assertEqual((result["p50_ms"], result["p99_ms"]), (500.0, 990.0))
        self.assertEqual(percentiles([])["samples"], 0)

    def test_saturated_side(self) -> None:
        self.assertEqual(saturated_side(0.97, 0.99), "daemon")
        self.assertEqual(saturated_side(0.5, 0.95), "generator")
        self.assertTrue(saturated_side(0.3, 0.3).startswith("neither"))

    def test_profile_summary_keeps_the_reactor_thread(self) -> None:
        folded = (
            "run (app.py:1);mainLoop (base.py:2);doRead (tcp.py:3) 3\n"
            "run (app.py:1);mainLoop (base.py:2);seal (crypto.py:4) 1\n"
            "_bootstrap (threading.py:5);wait (threading.py:6) 50\n"
        )
        summary = summarise_folded(folded)
        self.assertEqual(summary["samples"], 4)
        self.assertEqual(dict(summary["own"]), {"doRead (tcp.py)": 75.0, "seal (crypto.py)": 25.0})


class PushMetricsTests(SynchronousTestCase):
    """bench.push_outage reads the push figures from the daemon's /metrics page."""

    def test_reads_queue_depth_and_outcomes_from_the_real_exposition(self) -> None:
        metrics = NodeMetrics()
        metrics.push.queue_depth = lambda: 17
        for outcome, times in (("dropped", 3), ("retried", 5), ("gave_up", 2)):
            for _ in range(times):
                metrics.push.count("apns", outcome)
        metrics.push.count("fcm", "dropped")
        registry = CollectorRegistry()
        registry.register(NodeMetricsCollector(metrics, "bench"))
        found = parse_push_metrics(generate_latest(registry).decode())
        self.assertEqual(
            found,
            {
                "queue_depth": 17.0,
                "pushes_dropped": 4.0,
                "pushes_retried": 5.0,
                "pushes_gave_up": 2.0,
            },
        )

    def test_push_off_has_no_push_figures(self) -> None:
        registry = CollectorRegistry()
        registry.register(NodeMetricsCollector(NodeMetrics(), "bench"))
        self.assertEqual(parse_push_metrics(generate_latest(registry).decode()), {})


class SteadyTests(SynchronousTestCase):
    """bench.steady reads the daemon's lag probe from /metrics, before and after."""

    def _scrape(self, metrics: NodeMetrics) -> str:
        registry = CollectorRegistry()
        registry.register(NodeMetricsCollector(metrics, "n1"))
        return generate_latest(registry).decode()

    def test_stalls_of_the_window_are_counted_from_two_scrapes(self) -> None:
        clock = Clock()
        metrics = NodeMetrics()
        lag = metrics.reactor_lag = ReactorLag(clock, 0.005, cpu_time=lambda: 0.0)
        lag.start()
        clock.advance(0.2)  # a stall before the window: not the window's
        before = parse_reactor_gaps(self._scrape(metrics))
        for _ in range(10):
            clock.advance(0.005)
        clock.advance(0.03)
        clock.advance(0.012)
        after = parse_reactor_gaps(self._scrape(metrics))
        window = stalls_between(before, after)
        self.assertEqual((window["probe_runs"], window["stalls_over_10ms"]), (12, 2))
        # The longest since start (0.2 s) came before: the window's is bounded by a bucket.
        self.assertEqual((window["longest_stall_ms"], window["longest_exact"]), (50.0, False))
        clock.advance(0.3)
        later = parse_reactor_gaps(self._scrape(metrics))
        window = stalls_between(after, later)
        self.assertEqual((window["probe_runs"], window["stalls_over_10ms"]), (1, 1))
        self.assertAlmostEqual(window["longest_stall_ms"], 300.0)
        self.assertTrue(window["longest_exact"])
        # No CPU was used in any gap: none of them was the process's own work.
        cpu_after = parse_reactor_gaps(self._scrape(metrics), "cim_reactor_gap_cpu")
        self.assertEqual((cpu_after["count"], cpu_after["max_s"]), (14.0, 0.0))
        lag.stop()

    def test_the_reactors_holds_of_the_window_from_two_scrapes(self) -> None:
        metrics = NodeMetrics()
        # Without the holds (another reactor, an older --source): nothing to report.
        self.assertEqual(holds_between(self._scrape(metrics), self._scrape(metrics)), {})
        holds = metrics.reactor_holds = ReactorHolds()
        holds.observe(0.04)  # before the window
        before = self._scrape(metrics)
        for seconds in (0.0015, 0.003, 0.012, 0.02):
            holds.observe(seconds)
        window = holds_between(before, self._scrape(metrics))
        # Two over 10 ms; the longest since start came before, so a bucket bounds it.
        self.assertEqual(window["holds_over_10ms"], 2)
        self.assertEqual((window["longest_hold_ms"], window["longest_hold_exact"]), (25.0, False))
        [_, stalls, _] = steady_figures({**self._result(), **window})
        self.assertEqual(stalls[0].rsplit(": ", 1)[1], "longest reactor stall (between two polls)")
        self.assertTrue(stalls[1].startswith("25.0 ms (bound: bucket), 2 over 10 ms; lag probe"))
        self.assertEqual(stalls[3], "MISSES")  # the probe's count (0) is not the verdict
        # And the other way: the probe counts late timers, the holds say none was 10 ms.
        quiet = {**self._result(), "stalls_over_10ms": 3, "holds_over_10ms": 0}
        quiet["longest_hold_ms"] = 6.0
        [_, stalls, _] = steady_figures({**quiet, "longest_hold_exact": True})
        self.assertEqual(stalls[3], "meets")

    def test_the_collectors_pauses_of_the_window_from_two_scrapes(self) -> None:
        now = [0.0]
        metrics = NodeMetrics()
        pauses = metrics.collector_pauses = CollectorPauses(timer=lambda: now[0])

        def collect(generation: int, seconds: float) -> None:
            pauses.observe("start", {"generation": generation})
            now[0] += seconds
            pauses.observe("stop", {"generation": generation})

        collect(2, 0.0625)  # before the window
        before = parse_collector(self._scrape(metrics))
        collect(0, 0.001953125)
        collect(2, 0.015625)
        collect(2, 0.03125)
        window = collections_between(before, parse_collector(self._scrape(metrics)))
        self.assertEqual(window["gc_full_collections"], 2)
        self.assertEqual(window["gc_ms"], 1000 * (0.001953125 + 0.015625 + 0.03125))
        self.assertEqual(window["gc_longest_full_ms"], 62.5)  # since start
        [_, stalls, _] = steady_figures({**self._result(), **window})
        self.assertIn("2 full", stalls[1])

    def test_a_daemon_without_the_probe_is_an_error(self) -> None:
        with self.assertRaises(ValueError):
            parse_reactor_gaps(self._scrape(NodeMetrics()))

    def _result(self) -> dict[str, Any]:
        return {
            "offered_per_s": 2000,
            "seconds": 15.0,
            "p50_ms": 0.4,
            "p99_ms": 1.5,
            "p999_ms": 6.0,
            "max_ms": 9.0,
            "daemon_cpu_us_per_message": 90.0,
            "delivered_per_s": 2000.0,
            "longest_stall_ms": 8.0,
            "longest_exact": True,
            "stalls_over_10ms": 0,
            "totals": {"consistent": True, "received_matches": True},
        }

    def test_figures_judge_every_target(self) -> None:
        verdicts = [row[3] for row in steady_figures(self._result())]
        self.assertEqual(verdicts, ["MISSES", "meets", "meets"])
        self.assertEqual(steady_figures({"error": "boom"})[0][1], "FAILED")


def _three_node_run() -> dict[str, Any]:
    """A bench.scaling run as saved: 10 s without clients, 200 connections 10 s idle,
    1,000 messages."""
    return {
        "nodes": 3,
        "connections": 200,
        "rss_empty_kib": [50_000, 50_000, 50_000],
        "rss_connected_kib": [50_400, 50_400, 50_400],
        "empty": {"seconds": 10.0, "daemon_cpu": 0.01, "redis": {"calls": 100}},
        "idle": {"seconds": 10.0, "daemon_cpu": 0.02, "redis": {"calls": 400}},
        "load": {
            "offered_per_s": 100,
            "seconds": 10.0,
            "delivered": 1000,
            "failed": 0,
            "daemon_cpu": [0.1, 0.1, 0.1],
            "redis": {
                "calls": 5000,
                "commands": {"hset": 5000},
                "cpu": 0.02,
                "used_memory": 300_000,
            },
            "bus_messages": 1334,
            "postgresql": {
                "xact_commit": 500,
                "tup_inserted": 2000,
                "tup_updated": 1000,
                "tup_deleted": 0,
                "tup_fetched": 0,
            },
            "totals": {"consistent": True},
        },
        "loadavg": [1.0, 1.0, 1.0],
    }


class ScalingTests(SynchronousTestCase):
    """bench.scaling: costs per unit from the counted deltas, and the projection."""

    def test_costs_per_message_and_connection(self) -> None:
        unit = per_unit(_three_node_run())
        self.assertAlmostEqual(unit["cim_cpu_us_per_msg"], 300.0)
        self.assertAlmostEqual(unit["cim_rss_kib_per_conn"], 6.0)
        # Idle: (20 ms - the nodes' own 10 ms) / 10 s / 200 connections.
        self.assertAlmostEqual(unit["cim_idle_cpu_us_per_conn_s"], 5.0)
        self.assertAlmostEqual(unit["redis_ops_per_msg"], 5.0)
        self.assertAlmostEqual(unit["redis_ops_per_conn_s"], 0.15)
        self.assertAlmostEqual(unit["redis_cpu_us_per_op"], 4.0)
        self.assertAlmostEqual(unit["bus_msgs_per_msg"], 1.334)
        self.assertAlmostEqual(unit["pg_rows_written_per_msg"], 3.0)

    def test_projection_scales_each_component(self) -> None:
        low, high = project(_three_node_run(), users=1_000_000, rates=(10_000, 100_000))
        # cim: 10,000 x 300 us + 1M x 5 us/s = 8 cores, at 0.6 of a core each.
        self.assertAlmostEqual(low["cim_cores"], 8.0)
        self.assertEqual(low["cim_nodes"], 14)
        self.assertAlmostEqual(low["redis_ops_per_s"], 10_000 * 5 + 1_000_000 * 0.15)
        self.assertEqual(low["redis_shards"], 2)  # 200,000 x 4 us = 0.8 core
        self.assertAlmostEqual(high["pg_rows_per_s"], 300_000)
        # Bus messages follow the share crossing nodes: 2/3 measured, 13/14 at 14 nodes.
        self.assertAlmostEqual(low["bus_msgs_per_s"], 10_000 * 1.334 * (13 / 14) / (2 / 3))
        self.assertIn("| 10,000 msg/s | 8.0 | 14 |", markdown(_three_node_run()))

    def test_redis_deltas_leave_out_the_probe(self) -> None:
        before = {"commands": {"get": 5, "info": 2}, "used_memory": 100, "cpu": 1.0}
        after = {"commands": {"get": 9, "info": 4, "hset": 3}, "used_memory": 160, "cpu": 1.5}
        delta = redis_delta(before, after)
        self.assertEqual((delta["calls"], delta["commands"]), (7, {"get": 4, "hset": 3}))
        self.assertEqual(delta["used_memory"], 60)

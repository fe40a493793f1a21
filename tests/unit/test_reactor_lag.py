"""The reactor lag probe: gaps between its runs, the longest, and their rendering."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.metrics import CollectorPauses, NodeMetrics, NodeMetricsCollector, ReactorLag


class ReactorLagTests(SynchronousTestCase):
    def test_gaps_between_runs_are_counted_and_the_longest_kept(self) -> None:
        clock = Clock()
        lag = ReactorLag(clock, 0.005)
        lag.start()
        clock.advance(0.005)
        clock.advance(0.005)
        # The reactor was held for 40 ms: the next run comes that much later.
        clock.advance(0.040)
        clock.advance(0.005)
        self.assertEqual(lag.gaps.count, 4)
        self.assertAlmostEqual(lag.longest, 0.040)
        over_10ms = sum(
            count
            for bound, count in zip((*lag.gaps.bounds, float("inf")), lag.gaps.counts, strict=True)
            if bound > 0.01
        )
        self.assertEqual(over_10ms, 1)
        lag.stop()
        clock.advance(1.0)
        self.assertEqual(lag.gaps.count, 4)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cpu_within_each_gap_tells_own_work_from_waiting(self) -> None:
        clock = Clock()
        used = [0.0]
        lag = ReactorLag(clock, 0.005, cpu_time=lambda: used[0])
        lag.start()
        used[0] += 0.001
        clock.advance(0.005)
        # 60 ms of wall time, 2 ms of CPU: the process was waiting, not working.
        used[0] += 0.002
        clock.advance(0.060)
        # 30 ms of wall time, all of it CPU: its own work held the reactor.
        used[0] += 0.030
        clock.advance(0.030)
        self.assertAlmostEqual(lag.longest, 0.060)
        self.assertAlmostEqual(lag.longest_cpu, 0.030)
        self.assertEqual(lag.gap_cpu.count, 3)
        lag.stop()

    def test_off_schedules_nothing_and_renders_nothing(self) -> None:
        clock = Clock()
        lag = ReactorLag(clock, 0.0)
        lag.start()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(list(lag.families()), [])

    def test_metrics_show_the_gaps_once_the_probe_is_set(self) -> None:
        clock = Clock()
        metrics = NodeMetrics()
        registry = CollectorRegistry()
        registry.register(NodeMetricsCollector(metrics, "n1"))
        self.assertNotIn(b"cim_reactor_gap", generate_latest(registry))
        metrics.reactor_lag = ReactorLag(clock, 0.005)
        metrics.reactor_lag.start()
        clock.advance(0.030)
        text = generate_latest(registry).decode()
        self.assertIn('cim_reactor_gap_seconds_bucket{le="0.025"} 0.0', text)
        self.assertIn('cim_reactor_gap_seconds_bucket{le="0.05"} 1.0', text)
        self.assertIn("cim_reactor_gap_max_seconds 0.03", text)
        self.assertIn("cim_reactor_gap_cpu_seconds_count 1.0", text)
        self.assertIn("cim_reactor_gap_cpu_max_seconds", text)
        metrics.reactor_lag.stop()


class CollectorPausesTests(SynchronousTestCase):
    def test_each_collection_counted_by_generation_and_full_ones_histogrammed(self) -> None:
        now = [0.0]
        pauses = CollectorPauses(timer=lambda: now[0])
        # Powers of two: exact in binary, so the rendered numbers are exact too.
        for generation, seconds in ((0, 2**-10), (1, 2**-8), (2, 2**-5), (0, 2**-9)):
            pauses.observe("start", {"generation": generation})
            now[0] += seconds
            pauses.observe("stop", {"generation": generation, "collected": 0})
        self.assertEqual(pauses.collections, [2, 1, 1])
        self.assertEqual(pauses.seconds[0], 2**-10 + 2**-9)
        self.assertEqual(pauses.longest, [2**-9, 2**-8, 2**-5])
        self.assertEqual(pauses.full.count, 1)
        metrics = NodeMetrics()
        metrics.collector_pauses = pauses
        registry = CollectorRegistry()
        registry.register(NodeMetricsCollector(metrics, "n1"))
        text = generate_latest(registry).decode()
        self.assertIn('cim_gc_collections_total{generation="0"} 2.0', text)
        self.assertIn('cim_gc_pause_max_seconds{generation="2"} 0.03125', text)
        self.assertIn('cim_gc_full_pause_seconds_bucket{le="0.05"} 1.0', text)

    def test_installed_it_sees_a_real_collection_and_uninstalled_it_does_not(self) -> None:
        pauses = CollectorPauses()
        pauses.install()
        try:
            gc.collect()
        finally:
            pauses.uninstall()
        self.assertEqual(pauses.collections[2], 1)
        gc.collect()
        self.assertEqual(pauses.collections[2], 1)
        self.assertNotIn(pauses.observe, gc.callbacks)

"""Operations without a running node: the log section, the JSON log lines, the metrics."""

from __future__ import annotations

import json

from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from cim.config import parse_config
from cim.logs import JsonLinesObserver
from cim.metrics import Histogram, NodeMetrics, NodeMetricsCollector


class UnitTests(SynchronousTestCase):
    def test_log_section_defaults_and_choices(self) -> None:
        config = parse_config("[node]\nid = n1\n")
        self.assertEqual(
            (config.log.format, config.log.level, config.log.file), ("text", "info", "")
        )
        self.assertTrue(config.log.is_default)
        from cim.config import ConfigError

        self.assertRaises(ConfigError, parse_config, "[node]\nid = n1\n[log]\nformat = xml\n")

    def test_json_observer_writes_one_object_per_line(self) -> None:
        import io

        out = io.StringIO()
        observer = JsonLinesObserver(out, node="n1")
        observer(
            {
                "log_format": "kicked {user}: {reason}",
                "log_level": LogLevel.info,
                "log_namespace": "cim.x",
                "log_time": 0.0,
                "user": "bob",
                "reason": "multi\nline",
            }
        )
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        line = json.loads(lines[0])
        self.assertEqual(line["text"], "kicked bob: multi\nline")
        self.assertEqual((line["user"], line["node"], line["level"]), ("bob", "n1", "info"))

    def test_histogram_renders_cumulative_buckets(self) -> None:
        histogram = Histogram((0.1, 1.0))
        for value in (0.05, 0.5, 5.0):
            histogram.observe(value)
        family = histogram.family("cim_x", "x")
        samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
        self.assertEqual(samples[("cim_x_seconds_bucket", "0.1")], 1)
        self.assertEqual(samples[("cim_x_seconds_bucket", "1.0")], 2)
        self.assertEqual(samples[("cim_x_seconds_bucket", "+Inf")], 3)
        self.assertEqual(samples[("cim_x_seconds_count", None)], 3)

    def test_connection_states(self) -> None:
        metrics = NodeMetrics()
        metrics.connections_open = 5
        metrics.connections_established = lambda: 3
        families = {f.name: f for f in NodeMetricsCollector(metrics, "n1").collect()}
        values = {s.labels["state"]: s.value for s in families["cim_connection_states"].samples}
        self.assertEqual(values, {"handshaking": 2, "established": 3})
        self.assertNotIn("cim_offline_writer_pending", families)

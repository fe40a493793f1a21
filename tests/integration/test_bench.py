"""The benchmark's load generator counts every message exactly once.

No timing is asserted anywhere here (figures depend on the machine); these tests
check that the instrument is honest: its hand-built frames are the protocol's
frames, and after a drained load every msg:R sent is counted as delivered or failed.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from bench import distributed
from bench.catch_up import observe
from bench.daemon import BenchDaemon, DaemonSettings, ProcSample
from bench.scenarios import _fanout_finished
from bench.steps import PASSWORD
from bench.workers import WorkerPool
from cim.im.direct import REASON_NOT_ACCEPTED


class GeneratorCountTests(SynchronousTestCase):
    """A tiny real run: one unpinned daemon, one worker process, a few users."""

    def setUp(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        self.daemon = BenchDaemon(workdir, DaemonSettings(cpu=None))
        self.daemon.add_users([f"p{n}" for n in range(4)], PASSWORD)
        self.daemon.add_users(["s0", "c0", "c1"], PASSWORD)
        self.daemon.add_users([f"g{n}" for n in range(6)], PASSWORD)
        self.daemon.add_users(["f0", "f1", "o0"], PASSWORD)
        self.daemon.start()
        self.addCleanup(self.daemon.stop)
        self.pool = WorkerPool(1, self.daemon.router_url, None, workdir)
        self.addCleanup(self.pool.close)

    def call(self, command: dict[str, Any]) -> dict[str, Any]:
        return self.pool.call(command, timeout=120)[0]

    def wait_for(self, done: Any, what: str, timeout: float = 60) -> dict[str, Any]:
        """Poll the worker's totals until ``done(totals)``; fail the test, naming ``what``
        and the last totals, if that has not happened within ``timeout`` seconds (the
        later assertions would otherwise check a load that never ran)."""
        deadline = time.monotonic() + timeout
        while True:
            totals: dict[str, Any] = self.call({"cmd": "totals"})["totals"]
            if done(totals):
                return totals
            if time.monotonic() > deadline:
                self.fail(f"gave up after {timeout:g} s waiting for {what}; totals: {totals}")
            time.sleep(0.05)

    def test_window_load_counts_every_message_once(self) -> None:
        login = {"cmd": "login", "prefix": "p", "count": 4, "password": PASSWORD}
        self.assertEqual(self.call(login)["logged_in"], 4)
        self.assertEqual(self.call({"cmd": "connect", "prefix": "p", "count": 4})["connected"], 4)
        # p0 -> p1 is delivered; p2's messages go to a user who does not exist.
        self.call({"cmd": "load", "window": 4, "redirect": {"p2": "ghost"}})
        self.wait_for(
            lambda t: t["delivered"] >= 20 and t["failed"] >= 20, "20 delivered and 20 failed"
        )
        drained = self.call({"cmd": "stop_load", "timeout": 30})
        totals = drained["totals"]
        self.assertTrue(drained["drained"])
        self.assertEqual(totals["sent"], totals["delivered"] + totals["failed"])
        self.assertGreater(totals["delivered"], 0)
        self.assertGreater(totals["failed"], 0)
        self.assertEqual(totals["received"], totals["delivered"])
        # A name without an account is refused before the message is taken, with the
        # answer a refusal of consent gets (docs/privacy.md).
        self.assertEqual(set(drained["failure_reasons"]), {f"ERROR: {REASON_NOT_ACCEPTED}"})

        # Reconnected clients must not reuse sequence numbers: the node would take
        # their messages for retries of old ones and not deliver them again.
        self.call({"cmd": "close"})
        self.call({"cmd": "connect", "prefix": "p", "count": 2})
        self.call({"cmd": "load", "window": 4})
        self.wait_for(
            lambda t: t["delivered"] >= totals["delivered"] + 20,
            "20 more delivered after reconnecting",
        )
        again = self.call({"cmd": "stop_load", "timeout": 30})["totals"]
        self.assertEqual(again["sent"], again["delivered"] + again["failed"])
        self.assertEqual(again["received"], again["delivered"])

    def test_paced_load_and_churn_count_every_message_once(self) -> None:
        self.call({"cmd": "login", "prefix": "p", "count": 2, "password": PASSWORD})
        self.call({"cmd": "connect", "prefix": "p", "count": 2})
        self.call({"cmd": "load", "rate": 200})
        self.wait_for(lambda t: t["delivered"] >= 10, "10 delivered at 200/s")
        paced = self.call({"cmd": "stop_load", "timeout": 30})["totals"]
        self.assertEqual(paced["sent"], paced["delivered"] + paced["failed"])
        self.call({"cmd": "close"})

        self.call({"cmd": "login", "prefix": "s", "count": 1, "password": PASSWORD})
        self.call({"cmd": "connect", "prefix": "s", "count": 1})
        churned = self.call(
            {
                "cmd": "churn",
                "prefix": "c",
                "count": 2,
                "cycles": 6,
                "messages": 3,
                "password": PASSWORD,
            }
        )
        totals = churned["totals"]
        self.assertEqual(churned["cycles"], 6)
        self.assertEqual(totals["sent"], totals["delivered"] + totals["failed"])
        self.assertEqual(totals["sent"] - paced["sent"], 18)

    def test_group_fan_out_counts_every_delivery_once(self) -> None:
        """Every accepted group message reaches every other member once, acknowledged."""
        self.call({"cmd": "login", "prefix": "g", "count": 6, "password": PASSWORD})
        self.call({"cmd": "connect", "prefix": "g", "count": 6})
        created = self.call({"cmd": "group_create", "prefix": "g", "count": 6})
        self.assertEqual(created["member_count"], 6)
        before = self.pool.call({"cmd": "totals"}, 60)
        # Two of the six post; each message goes to the five others.
        self.call({"cmd": "load", "group": created["group"], "senders": 2, "rate": 100})
        self.wait_for(lambda t: t["accepted"] >= 20, "20 group messages accepted")
        drained = self.pool.call({"cmd": "stop_load", "timeout": 30}, 60)
        totals = _fanout_finished(self.pool, before, drained, receivers=5, timeout=30)
        self.assertTrue(totals["consistent"])
        self.assertEqual(totals["failed"], 0)
        self.assertEqual(totals["delivered"] + totals["stored"], 0)
        self.assertGreaterEqual(totals["accepted"], 20)
        self.assertEqual(totals["received"], totals["accepted"] * 5)
        self.assertEqual(totals["acks_answered"], totals["received"])
        self.assertTrue(totals["received_matches"] and totals["acknowledged_all"])

    def test_offline_pull_brings_every_stored_message_once(self) -> None:
        """Filled over the protocol, pulled by one login: pulled = stored, no duplicates."""
        self.call({"cmd": "login", "prefix": "f", "count": 2, "password": PASSWORD})
        self.call({"cmd": "connect", "prefix": "f", "count": 2})
        fill = self.call({"cmd": "fill", "to": "o0", "count": 150, "window": 4})
        self.assertTrue(fill["drained"])
        self.assertEqual((fill["counts"]["sent"], fill["counts"]["stored"]), (150, 150))
        self.assertEqual(fill["counts"]["failed"], 0)
        self.assertEqual(self.daemon.offline_count("o0"), 150)
        self.call({"cmd": "close"})

        pulled = self.call({"cmd": "offline_pull", "user": "o0", "password": PASSWORD})
        self.assertEqual((pulled["pulled"], pulled["unique"]), (150, 150))
        self.assertEqual(pulled["pages"], 2)  # the node's page size is 100
        # Acknowledging moves cursors: one per conversation (f0's and f1's with o0).
        self.assertEqual(pulled["acknowledged"], 2)
        self.assertEqual(pulled["left_after"], 0)
        self.assertEqual(pulled["senders"], {"f0": 75, "f1": 75})
        self.assertEqual(self.daemon.offline_count("o0"), 0)

    def test_catch_up_observes_one_summary_the_newest_page_first_and_every_message_once(
        self,
    ) -> None:
        """The catch-up scenario's instrument on a small backlog: its checks hold, and
        its counts are the stored ones."""
        self.call({"cmd": "login", "prefix": "f", "count": 2, "password": PASSWORD})
        self.call({"cmd": "connect", "prefix": "f", "count": 2})
        fill = self.call({"cmd": "fill", "to": "o0", "count": 250, "window": 4})
        self.assertEqual(fill["counts"]["stored"], 250)
        self.call({"cmd": "close"})

        row = observe(self.daemon, "o0", 250, 2, cpu=None)
        self.assertEqual(
            row["checks"],
            {
                "one_summary_frame": True,
                "newest_page_first": True,
                "pulled_is_stored_once": True,
                "nothing_left": True,
            },
        )
        self.assertTrue(row["consistent"])
        self.assertEqual((row["pulled"], row["unique"], row["stored"]), (250, 250, 250))
        self.assertEqual(row["summary_counts"], [125, 125])
        # 125 per conversation in pages of 100: two pages each, one pull in flight.
        self.assertEqual(row["sent"], {"OFFLINE_SUMMARY_R": 1, "OFFLINE_R": 4, "OFFLINE_ACK_R": 1})
        self.assertEqual(len(row["first_page"]), 100)
        self.assertIsNotNone(row["daemon_cpu_us_per_message"])
        self.assertEqual(self.daemon.offline_count("o0"), 0)


class GatewayGeneratorTests(SynchronousTestCase):
    """The generator over the WebSocket gateway (figure 9) counts exactly too."""

    def test_window_load_over_the_gateway_counts_every_message_once(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        daemon = BenchDaemon(workdir, DaemonSettings(cpu=None, websocket=True))
        daemon.add_users([f"p{n}" for n in range(4)], PASSWORD)
        daemon.start()
        self.addCleanup(daemon.stop)
        pool = WorkerPool(1, daemon.router_url, None, workdir)
        self.addCleanup(pool.close)

        def call(command: dict[str, Any]) -> dict[str, Any]:
            return pool.call(command, timeout=120)[0]

        login = {"cmd": "login", "prefix": "p", "count": 4, "password": PASSWORD}
        self.assertEqual(call(login)["logged_in"], 4)
        # Each connection is opened at the login's ws_url (none there: connect fails).
        connect = {"cmd": "connect", "prefix": "p", "count": 4, "transport": "websocket"}
        self.assertEqual(call(connect)["connected"], 4)
        call({"cmd": "load", "window": 4})
        deadline = time.monotonic() + 60
        while call({"cmd": "totals"})["totals"]["delivered"] < 50:
            self.assertLess(time.monotonic(), deadline, "50 messages through the gateway")
            time.sleep(0.05)
        drained = call({"cmd": "stop_load", "timeout": 30})
        totals = drained["totals"]
        self.assertTrue(drained["drained"])
        self.assertEqual(totals["sent"], totals["delivered"] + totals["failed"])
        self.assertEqual(totals["failed"], 0)
        self.assertEqual(totals["received"], totals["delivered"])


class DistributedCountTests(SynchronousTestCase):
    """bench.distributed's figures of one load: refusals are the load's own ERROR
    answers, CPU is summed over every node, crossings are per message sent."""

    def test_counts_of_one_load_over_two_nodes(self) -> None:
        refused = "ERROR: the node cannot take messages right now; retry"

        def answer(sent: int, delivered: int, failed: int, reasons: dict[str, int]) -> Any:
            totals = {
                "sent": sent,
                "delivered": delivered,
                "accepted": 0,
                "stored": 0,
                "failed": failed,
                "received": delivered,
                "acks_answered": delivered,
            }
            return {"totals": totals, "failure_reasons": reasons, "errors": {}}

        # Two workers; the first had 3 refusals and a failure of another kind before.
        before = [answer(100, 96, 4, {refused: 3, "no such user": 1}), answer(50, 50, 0, {})]
        drained = [
            answer(300, 290, 10, {refused: 12, "no such user": 2}),
            answer(250, 248, 2, {refused: 2}),
        ]
        reports = [
            {"counts": {"delivered": 180, "failed": 5}},
            {"counts": {"delivered": 190, "failed": 1}},
        ]
        starts = [ProcSample(10.0, 1.0, 0), ProcSample(10.0, 2.0, 0)]
        ends = [ProcSample(12.0, 1.5, 0), ProcSample(12.0, 2.25, 0)]
        row = distributed.counts(reports, before, drained, starts, ends, 0.37, 200)
        self.assertEqual(row["refused"], 9 + 2)
        self.assertEqual(row["refusals"], {refused: 11})
        self.assertEqual(row["delivered"], 370)
        self.assertEqual(row["failed_in_window"], 6)
        self.assertAlmostEqual(row["daemon_cpu_us_per_message"], 0.75e6 / 370)
        self.assertAlmostEqual(row["services_cpu_us_per_message"], 0.37e6 / 370)
        self.assertEqual(row["daemon_cpu_share_per_node"], [0.25, 0.125])
        self.assertEqual(row["totals"]["sent"], 400)
        self.assertTrue(row["totals"]["consistent"])
        self.assertAlmostEqual(row["crossing_share"], 200 / 400)

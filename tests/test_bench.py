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

from bench.daemon import BenchDaemon, DaemonSettings
from bench.loadgen import TEXT_SIZE, BenchConnection, varint
from bench.scenarios import (
    PASSWORD,
    _fanout_finished,
    percentiles,
    saturated_side,
    summarise_folded,
)
from bench.workers import WorkerPool, split
from cim.protocols import cim_pb2


class _PlainSealer:
    def seal(self, plaintext: bytes) -> bytes:
        return plaintext


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

    def wait_for(self, done: Any) -> dict[str, Any]:
        """Poll the worker's totals until ``done(totals)`` (bounded; not a timing check)."""
        deadline = time.monotonic() + 60
        while True:
            totals: dict[str, Any] = self.call({"cmd": "totals"})["totals"]
            if done(totals) or time.monotonic() > deadline:
                return totals
            time.sleep(0.05)

    def test_window_load_counts_every_message_once(self) -> None:
        login = {"cmd": "login", "prefix": "p", "count": 4, "password": PASSWORD}
        self.assertEqual(self.call(login)["logged_in"], 4)
        self.assertEqual(self.call({"cmd": "connect", "prefix": "p", "count": 4})["connected"], 4)
        # p0 -> p1 is delivered; p2's messages go to a user who does not exist.
        self.call({"cmd": "load", "window": 4, "redirect": {"p2": "ghost"}})
        self.wait_for(lambda t: t["delivered"] >= 20 and t["failed"] >= 20)
        drained = self.call({"cmd": "stop_load", "timeout": 30})
        totals = drained["totals"]
        self.assertTrue(drained["drained"])
        self.assertEqual(totals["sent"], totals["delivered"] + totals["failed"])
        self.assertGreater(totals["delivered"], 0)
        self.assertGreater(totals["failed"], 0)
        self.assertEqual(totals["received"], totals["delivered"])
        self.assertEqual(set(drained["failure_reasons"]), {"no such user"})

        # Reconnected clients must not reuse sequence numbers: the node would take
        # their messages for retries of old ones and not deliver them again.
        self.call({"cmd": "close"})
        self.call({"cmd": "connect", "prefix": "p", "count": 2})
        self.call({"cmd": "load", "window": 4})
        self.wait_for(lambda t: t["delivered"] >= totals["delivered"] + 20)
        again = self.call({"cmd": "stop_load", "timeout": 30})["totals"]
        self.assertEqual(again["sent"], again["delivered"] + again["failed"])
        self.assertEqual(again["received"], again["delivered"])

    def test_paced_load_and_churn_count_every_message_once(self) -> None:
        self.call({"cmd": "login", "prefix": "p", "count": 2, "password": PASSWORD})
        self.call({"cmd": "connect", "prefix": "p", "count": 2})
        self.call({"cmd": "load", "rate": 200})
        self.wait_for(lambda t: t["delivered"] >= 10)
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
        self.wait_for(lambda t: t["accepted"] >= 20)
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
        self.assertEqual(pulled["acknowledged"], 150)
        self.assertEqual(pulled["left_after"], 0)
        self.assertEqual(pulled["senders"], {"f0": 75, "f1": 75})
        self.assertEqual(self.daemon.offline_count("o0"), 0)

"""cim.oplog: one JSON object per line, no secrets, rotation, and never raising."""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.trial.unittest import TestCase

from cim.config import parse_config
from cim.oplog import ADMIN, HANDSHAKE_FAILED, KICK, LOGIN, LOGOUT, OperationLog, redact
from tests.unit.test_bus_memory import LogCapture

NOW = 1_700_000_000.25


class OperationLogTests(TestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "logs", "operations.log")
        self.log = OperationLog(self.path, node="node1", clock=lambda: NOW)
        self.addCleanup(self.log.close)

    def lines(self) -> list[dict[str, Any]]:
        with open(self.path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]

    def test_one_json_object_per_event(self) -> None:
        self.log.emit(LOGIN, user="alice", peer=IPv4Address("TCP", "10.0.0.7", 50123), device="cli")
        self.log.emit(LOGOUT, user="alice", peer=("::1", 9000))
        self.log.emit(KICK, user="bob", reason="logged in elsewhere")
        self.log.emit(HANDSHAKE_FAILED, peer=IPv6Address("TCP", "::1", 4), reason="bad MAC")
        self.log.emit(ADMIN, user="root", action="user.add", target="carol")
        lines = self.lines()
        self.assertEqual(
            lines[0],
            {
                "time": "2023-11-14T22:13:20.250Z",
                "event": "login",
                "node": "node1",
                "user": "alice",
                "peer": "10.0.0.7:50123",
                "detail": {"device": "cli"},
            },
        )
        self.assertEqual(lines[1]["peer"], "[::1]:9000")
        self.assertEqual((lines[2]["user"], lines[2]["peer"]), ("bob", None))
        self.assertEqual(lines[3]["peer"], "[::1]:4")
        self.assertEqual(lines[4]["detail"], {"action": "user.add", "target": "carol"})
        self.assertEqual(
            [line["event"] for line in lines], [LOGIN, LOGOUT, KICK, HANDSHAKE_FAILED, ADMIN]
        )
        self.assertEqual(self.log.written, 5)

    def test_secrets_never_reach_the_file(self) -> None:
        self.log.emit(
            LOGIN,
            user="alice",
            password="hunter2-password",
            token="tok-secret-123",
            detail={"new_password": "pw-2", "sessionToken": "tok-2", "list": [{"rsa_key": "k"}]},
            amqp="amqp://cim:brokerpass@mq/%2F",
            design="kept",
        )
        with open(self.path, encoding="utf-8") as handle:
            text = handle.read()
        for secret in ("hunter2", "tok-secret", "pw-2", "tok-2", '"k"', "brokerpass"):
            self.assertNotIn(secret, text)
        detail = self.lines()[0]["detail"]
        self.assertEqual(detail["password"], "[redacted]")
        self.assertEqual(detail["detail"]["list"], [{"rsa_key": "[redacted]"}])
        self.assertEqual(detail["amqp"], "amqp://cim:***@mq/%2F")
        self.assertEqual(detail["design"], "kept")
        self.assertEqual(redact(b"\x00key"), "<4 bytes>")

    def test_file_is_private_to_the_log_readers(self) -> None:
        self.log.emit(LOGIN, user="alice")
        mode = stat.S_IMODE(os.stat(self.path).st_mode)
        self.assertEqual(mode & 0o007, 0)

    def test_reopen_follows_rotation(self) -> None:
        self.log.emit(LOGIN, user="alice")
        os.rename(self.path, self.path + ".1")
        self.log.emit(LOGOUT, user="alice")  # still into the rotated file
        self.log.reopen()
        self.log.emit(LOGIN, user="bob")
        self.assertEqual([line["user"] for line in self.lines()], ["bob"])
        with open(self.path + ".1", encoding="utf-8") as handle:
            self.assertEqual(len(handle.readlines()), 2)

    def test_disabled_log_does_nothing(self) -> None:
        log = OperationLog(None, node="node1", clock=lambda: NOW)
        self.assertFalse(log.enabled)
        log.emit(LOGIN, user="alice")
        log.reopen()
        log.close()
        self.assertEqual(log.written, 0)

    def test_failures_never_raise(self) -> None:
        blocker = self.mktemp()
        with open(blocker, "w") as handle:
            handle.write("a file, not a directory")
        logs = LogCapture(self, "cim.oplog")
        log = OperationLog(os.path.join(blocker, "operations.log"), "node1", lambda: NOW)
        log.emit(LOGIN, user="alice")
        log.emit(LOGIN, user="alice")
        self.assertEqual((log.written, log.failed), (0, 2))
        self.assertEqual(len(logs.lines("error")), 1)  # once, not per event
        self.log.emit("Not An Event")
        self.assertEqual(self.log.failed, 1)
        self.assertTrue(self.flushLoggedErrors(ValueError))


class ConfigTests(TestCase):
    def test_operation_log_path(self) -> None:
        config = parse_config("[node]\nid = n1\ndata_dir = /var/lib/cim\n")
        self.assertEqual(config.operation_log_path, "/var/lib/cim/operations.log")
        config = parse_config("[node]\nid = n1\noperation_log = /var/log/cim/ops.log\n")
        self.assertEqual(config.operation_log_path, "/var/log/cim/ops.log")
        config = parse_config("[node]\nid = n1\noperation_log = off\n")
        self.assertIsNone(config.operation_log_path)

    def test_archive_section(self) -> None:
        config = parse_config("[node]\nid = n1\n")
        self.assertEqual(
            (config.archive.queue, config.archive.batch_size, config.retention_days),
            ("cim.archive", 500, None),
        )
        config = parse_config(
            "[node]\nid = n1\n[archive]\nretention_days = 30\nbatch_wait = 200ms\n"
        )
        self.assertEqual((config.retention_days, config.archive.batch_wait), (30.0, 0.2))

    def test_timeline_settings_from_config(self) -> None:
        from cim.history.timeline import timeline_settings

        config = parse_config(
            "[node]\nid = n1\n[offline]\nbatch_size = 7\nbatch_wait = 5ms\n"
            "[archive]\nretention_days = 30\nmax_buffer = 90\npurge_batch = 11\n"
            "[state]\ndedup_window = 120s\n"
        )
        settings = timeline_settings(config)
        self.assertEqual(
            (
                settings.batch_size,
                settings.batch_wait,
                settings.max_backlog,
                settings.retention_days,
                settings.purge_batch,
                settings.dedup_window,
            ),
            (7, 0.005, 90, 30.0, 11, 120.0),
        )
        # Keys of the removed pipelines still parse (docs/operations.md says they do
        # nothing now).
        parse_config(
            "[node]\nid = n1\n[archive]\nenabled = false\nwriter = false\nqueue = q\n"
            "[offline]\nmax_per_user = 5\nwriter = false\nqueue = q\nmax_queued = 9\n"
        )

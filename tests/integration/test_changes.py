"""Recall and edit with real processes (#15 acceptance 4): cim-client recall and edit
against a real daemon; bob's listen shows them live, and, having been away, at his next
catch-up, where the recalled message has no content any more; history agrees; recall
and edit after the window, and of another user's message, are refused (exit 4, the
reason in a JSON line) and change nothing.

The windows are 15 s (``[im] recall_window``/``edit_window``), so a change made right
after its message is inside, and the test waits (bounded) until one has passed.

Several devices of each user at once (live and at catch-up, and across a node's
death) are tests.integration.test_devices_changes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.support.daemons import PASSWORD, DaemonProcess, client

WINDOW = 15.0


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.strip().splitlines()]


class ChangesEndToEndTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.daemon = DaemonProcess(
            os.path.abspath(self.mktemp()),
            extra=f"[im]\nrecall_window = {WINDOW:g}s\nedit_window = {WINDOW:g}s\n",
        )
        for user in ("alice", "bob"):
            added = self.daemon.cimctl("user", "add", user, stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        self.daemon.start()
        self.addCleanup(self.daemon.stop)

    def ok(self, user: str, *args: str) -> dict[str, Any]:
        done = client(self.daemon, user, *args)
        self.assertEqual(done.returncode, 0, done.stderr)
        [record] = lines(done.stdout)
        return record

    def refused(self, user: str, *args: str) -> str:
        done = client(self.daemon, user, *args)
        self.assertEqual(done.returncode, 4, done.stderr)
        [record] = lines(done.stdout)
        self.assertEqual(record["status"], "refused")
        reason: str = record["reason"]
        return reason

    def send(self, text: str) -> str:
        outcome = self.ok("alice", "send", "bob", text)
        self.assertIn(outcome["status"], ("delivered", "stored"))
        msg_id: str = outcome["msg_id"]
        return msg_id

    def listen(self, count: int) -> Any:
        return client(
            self.daemon,
            "bob",
            "listen",
            "--count",
            str(count),
            "--timeout",
            "60",
            background=True,
        )

    def finish(self, listener: Any) -> list[dict[str, Any]]:
        try:
            out, err = listener.communicate(timeout=90)
        finally:
            if listener.poll() is None:
                listener.kill()
                listener.communicate()
        self.assertEqual(listener.returncode, 0, err)
        return lines(out)

    def test_recall_and_edit_live_at_catch_up_and_refused(self) -> None:
        # Live: bob is listening while alice edits one message and recalls another.
        listener = self.listen(4)
        self.daemon.wait_connections(1)
        first = self.send("one")
        taken = time.monotonic()  # the node took it before this: its windows end by here + 15 s
        edit = self.ok("alice", "edit", first, "one, edited")
        self.assertEqual(
            (edit["event"], edit["msg_id"], edit["text"]), ("edit", first, "one, edited")
        )
        second = self.send("two")
        recall = self.ok("alice", "recall", second)
        self.assertEqual(
            (recall["event"], recall["msg_id"], recall["by"]), ("recall", second, "alice")
        )
        live = self.finish(listener)
        self.assertEqual(
            [(line.get("event"), line["msg_id"], line.get("text")) for line in live],
            [
                (None, first, "one"),
                ("edit", first, "one, edited"),
                (None, second, "two"),
                ("recall", second, None),
            ],
        )

        # Catch-up: bob is away while alice does it again; his next listen brings it.
        third = self.send("three")
        self.ok("alice", "edit", third, "three, fixed")
        fourth = self.send("four: a secret")
        self.ok("alice", "recall", fourth)
        caught = self.finish(self.listen(4))
        self.assertEqual(
            [(line.get("event"), line["msg_id"]) for line in caught],
            [(None, third), ("edit", third), (None, fourth), ("recall", fourth)],
        )
        self.assertEqual((caught[0]["text"], caught[0]["edited"]), ("three, fixed", True))
        self.assertTrue(caught[2]["recalled"])
        self.assertNotIn("text", caught[2])  # the content is gone, at catch-up too
        history = client(self.daemon, "alice", "history", "bob")
        self.assertEqual(history.returncode, 0, history.stderr)
        self.assertNotIn("a secret", history.stdout)
        by_id = {line["msg_id"]: line for line in lines(history.stdout) if "change" not in line}
        self.assertTrue(by_id[second]["recalled"])
        self.assertEqual(by_id[first]["text"], "one, edited")

        # Refused: someone else's message; after the window. Nothing changes.
        self.assertEqual(self.refused("bob", "recall", first), "not_yours")
        self.assertEqual(self.refused("bob", "edit", first, "bob's words"), "not_yours")
        past = taken + WINDOW + 1 - time.monotonic()
        if past > 0:
            time.sleep(past)  # until the first message's windows have passed (bounded)
        self.assertEqual(self.refused("alice", "recall", first), "too_late")
        self.assertEqual(self.refused("alice", "edit", first, "too late"), "too_late")
        self.assertEqual(self.refused("alice", "recall", "12345"), "unknown_message")
        after = client(self.daemon, "alice", "history", "bob")
        texts = {line["msg_id"]: line.get("text") for line in lines(after.stdout)}
        self.assertEqual(texts[first], "one, edited")
        self.assertEqual(len(lines(after.stdout)), 8)  # 4 messages, 4 changes: no more

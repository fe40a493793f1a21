"""The chaos run's counting (tests/integration/support/chaos/ledger.py): each figure of
its table counts what it says, so a run that loses, repeats or reorders cannot pass."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.client.answers import RequestRefused
from cim.protocols import cim_pb2
from tests.integration.support.chaos.app import REFUSAL_DELAY, ChaosApp, Shown
from tests.integration.support.chaos.ledger import DIRECT, GROUP, HEADER, Ledger, Row, table


def shown(text: str, sender: str = "a", seq: int = 0, client_seq: int = 0) -> Shown:
    return Shown(text, sender, "d:a:b", seq, client_seq)


class LedgerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ledger = Ledger()
        self.ledger.phase("fault")

    def row(self, kind: str = DIRECT, phase: str = "fault") -> Row:
        [row] = [r for r in self.ledger.rows() if (r.phase, r.kind) == (phase, kind)]
        return row

    def test_outcomes_are_counted_and_missing_ones_are_unanswered(self) -> None:
        for key, status in (("1", "delivered"), ("2", "stored"), ("3", "failed"), ("4", "")):
            self.ledger.send(key, DIRECT, "a", ("b",))
            if status:
                self.ledger.outcome(key, status)
        row = self.row()
        self.assertEqual((row.sent, row.statuses["delivered"], row.statuses["stored"]), (4, 1, 1))
        self.assertEqual((row.failed, row.unanswered), (1, 1))
        self.assertEqual(self.ledger.unanswered(), 1)

    def test_a_copy_told_fine_and_never_shown_is_lost_per_member(self) -> None:
        self.ledger.send("g1", GROUP, "m0", ("m1", "m2", "m3"))
        self.ledger.outcome("g1", "accepted")
        self.ledger.show("m1", shown("g1", "m0", client_seq=1))
        self.assertEqual(self.row(GROUP).lost, 2)
        self.assertEqual(self.ledger.missing(), 2)

    def test_each_missing_copy_is_named_with_the_seqs_around_its_hole(self) -> None:
        for n in (1, 2, 3, 4):
            self.ledger.send(f"g{n}", GROUP, "m0", ("m1",))
            self.ledger.outcome(f"g{n}", "accepted")
        for n in (1, 2, 4):
            self.ledger.show("m1", Shown(f"g{n}", "m0", "g:7", n, n))
        self.assertEqual(
            self.ledger.missing_copies(),
            ["m1 never shown g3 (group from m0, fault, accepted); shown seqs: g:7: 1-2, 4"],
        )

    def test_a_failed_message_is_not_lost_but_showing_it_is_counted(self) -> None:
        self.ledger.send("1", DIRECT, "a", ("b",))
        self.ledger.outcome("1", "failed")
        self.assertEqual(self.row().lost, 0)
        self.ledger.show("b", shown("1"))
        self.assertEqual(self.row().shown_though_failed, 1)

    def test_duplicates_are_counted_per_receiver(self) -> None:
        self.ledger.send("1", DIRECT, "a", ("b",))
        self.ledger.outcome("1", "delivered")
        for _ in range(3):
            self.ledger.show("b", shown("1", client_seq=1))
        row = self.row()
        self.assertEqual((row.duplicates, row.lost, row.order_violations), (2, 0, 0))

    def test_order_by_seq_when_the_wire_has_it(self) -> None:
        for key in ("1", "2", "3"):
            self.ledger.send(key, DIRECT, "a" if key != "2" else "b", ("b",))
            self.ledger.outcome(key, "delivered")
        # Different senders of one conversation: only the server's seq orders them.
        self.ledger.show("b", shown("1", "a", seq=1, client_seq=10))
        self.ledger.show("b", shown("3", "a", seq=3, client_seq=11))
        self.ledger.show("b", shown("2", "b", seq=2, client_seq=5))
        self.assertEqual(self.row().order_violations, 1)

    def test_order_by_each_senders_client_seq_without_seq(self) -> None:
        for key in ("1", "2", "3", "4"):
            self.ledger.send(key, DIRECT, "a", ("b",))
            self.ledger.outcome(key, "delivered")
        self.ledger.show("b", shown("1", "a", client_seq=1))
        self.ledger.show("b", shown("3", "a", client_seq=3))
        self.ledger.show("b", shown("2", "a", client_seq=2))
        # Another sender's lower numbers are no violation: they are its own order.
        self.ledger.show("b", shown("4", "z", client_seq=1))
        self.assertEqual(self.row().order_violations, 1)

    def test_messages_count_in_the_phase_they_were_sent_in(self) -> None:
        self.ledger.send("1", DIRECT, "a", ("b",))
        self.ledger.phase("later")
        self.ledger.send("2", DIRECT, "a", ("b",))
        self.ledger.outcome("1", "delivered")
        self.ledger.outcome("2", "delivered")
        self.ledger.show("b", shown("2", client_seq=2))
        self.assertEqual((self.row().lost, self.row(phase="later").lost), (1, 0))

    def test_messages_the_run_did_not_send_are_ignored(self) -> None:
        self.ledger.show("b", shown("a system notice"))
        self.assertEqual(self.ledger.shown, {})

    def test_the_table_has_a_line_per_phase_and_kind(self) -> None:
        self.ledger.send("1", DIRECT, "a", ("b",))
        text = table(self.ledger.rows())
        self.assertEqual(text.splitlines()[0], HEADER)
        self.assertIn("| fault | 1:1 | 1 | 0 | 0 | 0 | 0 | 1 | 0 | 0 | 0 | 0 |", text)
        self.assertIn("| fault | group | 0 |", text)
        self.assertEqual(len(text.splitlines()), 4)


class RefusedFillTests(SynchronousTestCase):
    """The run's standing fault (``ChaosApp`` ``refuse_fills``): a gap fill refused as the
    node's UNAVAILABLE would be, later; anything else asked goes on to the library."""

    def app(self, share: float) -> tuple[ChaosApp, Clock]:
        clock = Clock()
        app = ChaosApp(clock, ["http://router.invalid"], "u1", "pw", lambda *_: None, share)
        return app, clock

    def test_every_fill_refused_at_a_share_of_one(self) -> None:
        app, clock = self.app(1.0)
        asked = app._client.answers.history(cim_pb2.HistoryR(group="g", after=4, before=7))
        self.assertNoResult(asked)
        clock.advance(REFUSAL_DELAY)
        failure = self.failureResultOf(asked, RequestRefused)
        self.assertEqual(failure.value.code, cim_pb2.Error.UNAVAILABLE)
        self.assertEqual((app.fills, app.refused_fills), (1, 1))

    def test_history_pages_and_an_unrefusing_run_go_to_the_library(self) -> None:
        app, _ = self.app(1.0)
        page = app._client.answers.history(cim_pb2.HistoryR(group="g", before=7))
        self.failureResultOf(page)  # the library's own answer: not connected
        self.assertEqual((app.fills, app.refused_fills), (0, 0))
        plain, _ = self.app(0.0)
        self.assertNotIn("history", vars(plain._client.answers))

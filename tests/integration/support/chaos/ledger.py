"""What the chaos run sent, what senders were told, what applications were shown.

Pure bookkeeping (no I/O, no reactor), so its counting is unit tested
(tests/unit/test_chaos_ledger.py). Every message belongs to the phase (fault) during
which it was sent; everything found about it is counted in that phase's row.

- ``lost``: a copy the sender was told went well (delivered, stored, accepted) that
  its receiver's application was never shown. For a group, each member is a copy.
- ``duplicates``: a message shown more than once to one application.
- ``order violations``: in one receiver's view of one conversation, a message shown
  after one the server put later: by the server's ``seq`` where the wire has it, else
  by the sender's ``client_seq`` among that sender's messages of the conversation.
- ``shown though failed``: a message the sender was told failed that was shown anyway
  (the user would send it again: a duplicate in the making).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from tests.integration.support.chaos.app import Shown

DIRECT = "1:1"
GROUP = "group"
KINDS = (DIRECT, GROUP)
TOLD_OK = ("delivered", "stored", "accepted")
STATUSES = ("delivered", "stored", "accepted", "failed")


@dataclass
class Sent:
    phase: str
    kind: str
    sender: str
    recipients: tuple[str, ...]
    status: str = ""
    """The outcome the sender's library reported; empty while there is none."""
    reason: str = ""


@dataclass
class Row:
    """One table row: a phase's messages of one kind."""

    phase: str
    kind: str
    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    unanswered: int = 0
    failure_reasons: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    duplicates: int = 0
    order_violations: int = 0
    shown_though_failed: int = 0

    @property
    def failed(self) -> int:
        return self.statuses["failed"]


class Ledger:
    def __init__(self) -> None:
        self.sent: dict[str, Sent] = {}
        self.phases: list[str] = []
        # Per receiver, everything its application was shown, in the order shown.
        self.shown: dict[str, list[Shown]] = defaultdict(list)

    def phase(self, name: str) -> None:
        if name in self.phases:
            raise ValueError(f"phase {name!r} twice")
        self.phases.append(name)

    @property
    def current(self) -> str:
        return self.phases[-1]

    def send(self, key: str, kind: str, sender: str, recipients: tuple[str, ...]) -> None:
        if key in self.sent:
            raise ValueError(f"message {key!r} sent twice")
        self.sent[key] = Sent(self.current, kind, sender, recipients)

    def outcome(self, key: str, status: str, reason: str = "") -> None:
        sent = self.sent[key]
        sent.status, sent.reason = status, reason

    def show(self, receiver: str, shown: Shown) -> None:
        """The application was handed a message; ones the run did not send are ignored."""
        if shown.text in self.sent:
            self.shown[receiver].append(shown)

    # --- questions the run waits on ---------------------------------------------------

    def unanswered(self) -> int:
        return sum(1 for sent in self.sent.values() if not sent.status)

    def summary(self, phase: str) -> str:
        """One line of a phase's outcomes so far (copies may still be on their way)."""
        parts = []
        for row in self.rows():
            if row.phase == phase:
                counts = ", ".join(
                    f"{row.statuses[status]} {status}"
                    for status in STATUSES
                    if row.statuses[status]
                )
                parts.append(f"{row.kind}: {row.sent} sent, {counts or 'none ended'}")
        return "; ".join(parts)

    def missing(self) -> int:
        """Copies told to be fine and not shown yet."""
        shown = {(receiver, s.text) for receiver, views in self.shown.items() for s in views}
        return sum(
            1
            for key, sent in self.sent.items()
            if sent.status in TOLD_OK
            for receiver in sent.recipients
            if (receiver, key) not in shown
        )

    def missing_copies(self, most: int = 10) -> list[str]:
        """The first ``most`` copies ``missing`` counts, one line each: whose, which
        message, and the seqs that receiver was shown in the message's conversations
        (where the hole is)."""
        shown = {(receiver, s.text) for receiver, views in self.shown.items() for s in views}
        lines = []
        for key, sent in self.sent.items():
            if sent.status not in TOLD_OK:
                continue
            for receiver in sent.recipients:
                if (receiver, key) in shown or len(lines) >= most:
                    continue
                seqs: dict[str, list[int]] = defaultdict(list)
                for view in self.shown[receiver]:
                    if view.sender == sent.sender or sent.kind == GROUP:
                        seqs[view.conversation].append(view.seq)
                around = "; ".join(
                    f"{conversation}: {_ranges(sorted(numbers))}"
                    for conversation, numbers in sorted(seqs.items())
                    if sent.kind == DIRECT or conversation.startswith("g")
                )
                lines.append(
                    f"{receiver} never shown {key} ({sent.kind} from {sent.sender}, "
                    f"{sent.phase}, {sent.status}); shown seqs: {around or 'none'}"
                )
        return lines

    # --- the table --------------------------------------------------------------------

    def rows(self) -> list[Row]:
        rows = {(phase, kind): Row(phase, kind) for phase in self.phases for kind in KINDS}
        for sent in self.sent.values():
            row = rows[(sent.phase, sent.kind)]
            row.sent += 1
            if sent.status:
                row.statuses[sent.status] += 1
                if sent.status == "failed":
                    row.failure_reasons[sent.reason] += 1
            else:
                row.unanswered += 1
        counts: Counter[tuple[str, str]] = Counter(
            (receiver, s.text) for receiver, views in self.shown.items() for s in views
        )
        for key, sent in self.sent.items():
            row = rows[(sent.phase, sent.kind)]
            for receiver in sent.recipients:
                times = counts[(receiver, key)]
                if times == 0 and sent.status in TOLD_OK:
                    row.lost += 1
                if times > 1:
                    row.duplicates += times - 1
                if times and sent.status == "failed":
                    row.shown_though_failed += 1
        for views in self.shown.values():
            for later in self._out_of_order(views):
                sent = self.sent[later.text]
                rows[(sent.phase, sent.kind)].order_violations += 1
        return list(rows.values())

    @staticmethod
    def _out_of_order(views: list[Shown]) -> list[Shown]:
        """Messages shown after one the server (or their sender) put after them.

        Each message is compared with the highest place shown before it in its
        conversation (by seq) or in its sender's part of it (by client_seq); a repeat of
        one already shown is a duplicate, not a violation.
        """
        highest: dict[tuple[str, ...], int] = {}
        seen: set[str] = set()
        late: list[Shown] = []
        for shown in views:
            if shown.text in seen:
                continue
            seen.add(shown.text)
            if shown.seq:
                scope: tuple[str, ...] = ("seq", shown.conversation)
                place = shown.seq
            else:
                scope = ("client_seq", shown.conversation, shown.sender)
                place = shown.client_seq
            if place < highest.get(scope, 0):
                late.append(shown)
            else:
                highest[scope] = place
        return late


HEADER = (
    "| fault | kind | sent | delivered | stored | accepted | failed | unanswered "
    "| LOST | DUPLICATES | ORDER VIOLATIONS | shown though failed |"
)


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table (the same text on the console and in the docs)."""
    lines = [HEADER, "|" + " --- |" * 12]
    for row in rows:
        lines.append(
            f"| {row.phase} | {row.kind} | {row.sent} | {row.statuses['delivered']} "
            f"| {row.statuses['stored']} | {row.statuses['accepted']} | {row.failed} "
            f"| {row.unanswered} | {row.lost} | {row.duplicates} | {row.order_violations} "
            f"| {row.shown_though_failed} |"
        )
    return "\n".join(lines)


def _ranges(numbers: list[int]) -> str:
    """1-4, 6, 9-12: a sorted list of seqs, its runs joined."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], n)
        else:
            runs.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)

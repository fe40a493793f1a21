"""The Redis backend's receipts facet: the answer to each sender message, on every node.

Claims and outcomes made while one of their kind is in flight go together as the next
script call (``gather.Gather``): under load, one call for a turn's claims and one for
its outcomes, not one call per message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from cim.backends.state.redis import scripts
from cim.backends.state.redis.core import RedisCore
from cim.backends.state.redis.gather import Gather
from cim.interfaces import IReceiptStore, MessageReceipt


@implementer(IReceiptStore)
class RedisReceiptStore:
    """Receipts that Redis forgets by itself once the dedup window has passed."""

    def __init__(self, core: RedisCore, dedup_window: float) -> None:
        self._core = core
        self._ttl_ms = str(int(dedup_window * 1000))
        self._claims: Gather[tuple[str, str, str]] = Gather(self._remember)
        self._outcomes: Gather[tuple[str, str, str]] = Gather(self._record)

    def remember_message(
        self, sender: str, device: str, client_seq: int, msg_id: int, sent_at_ms: int
    ) -> Deferred[MessageReceipt | None]:
        d = self._claims.call((_sent_key(sender, device, client_seq), str(msg_id), str(sent_at_ms)))
        return d

    def record_outcome(
        self, sender: str, device: str, client_seq: int, status: int, reason: str
    ) -> Deferred[None]:
        d = self._outcomes.call((_sent_key(sender, device, client_seq), str(status), reason))
        return d.addCallback(lambda _: None)

    def _remember(self, claims: Sequence[tuple[str, str, str]]) -> Deferred[list[Any]]:
        d = self._core.eval(scripts.REMEMBER_MESSAGES, self._ttl_ms, *_flat(claims))
        return d.addCallback(_spread, len(claims))

    def _record(self, outcomes: Sequence[tuple[str, str, str]]) -> Deferred[list[Any]]:
        d = self._core.eval(scripts.RECORD_OUTCOMES, *_flat(outcomes))
        return d.addCallback(lambda _: [None] * len(outcomes))


def _spread(known: list[Any], count: int) -> list[MessageReceipt | None]:
    """One answer per claim from the script's list of only the known ones."""
    answers: list[MessageReceipt | None] = [None] * count
    for at in range(0, len(known), 5):
        index, msg, sent_at, status, reason = known[at : at + 5]
        answers[int(index) - 1] = MessageReceipt(
            int(msg), int(sent_at), int(status or 0), reason or ""
        )
    return answers


def _flat(items: Sequence[tuple[str, str, str]]) -> list[str]:
    return [value for item in items for value in item]


def _sent_key(sender: str, device: str, client_seq: int) -> str:
    # Lengths first, so no user or device name can make two triples collide.
    return f"{len(sender)}:{sender}:{len(device)}:{device}:{client_seq}"

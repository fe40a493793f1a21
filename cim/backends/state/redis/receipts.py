"""The Redis backend's receipts facet: the answer to each sender message, on every node."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from cim.backends.state.redis import scripts
from cim.backends.state.redis.core import RedisCore
from cim.interfaces import IReceiptStore, MessageReceipt


@implementer(IReceiptStore)
class RedisReceiptStore:
    """Receipts that Redis forgets by itself once the dedup window has passed."""

    def __init__(self, core: RedisCore, dedup_window: float) -> None:
        self._core = core
        self._dedup_window = dedup_window

    def remember_message(
        self, sender: str, device: str, client_seq: int, msg_id: int, sent_at_ms: int
    ) -> Deferred[MessageReceipt | None]:
        d = self._core.eval(
            scripts.REMEMBER_MESSAGE,
            _sent_key(sender, device, client_seq),
            str(msg_id),
            str(sent_at_ms),
            str(int(self._dedup_window * 1000)),
        )

        def receipt(reply: list[Any] | None) -> MessageReceipt | None:
            if not reply:
                return None
            msg, sent_at, status, reason = reply
            return MessageReceipt(int(msg), int(sent_at), int(status or 0), reason or "")

        return d.addCallback(receipt)

    def record_outcome(
        self, sender: str, device: str, client_seq: int, status: int, reason: str
    ) -> Deferred[None]:
        d = self._core.eval(
            scripts.RECORD_OUTCOME, _sent_key(sender, device, client_seq), str(status), reason
        )
        return d.addCallback(lambda _: None)


def _sent_key(sender: str, device: str, client_seq: int) -> str:
    # Lengths first, so no user or device name can make two triples collide.
    return f"{len(sender)}:{sender}:{len(device)}:{device}:{client_seq}"

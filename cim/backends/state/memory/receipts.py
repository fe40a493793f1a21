"""The memory backend's receipts facet: what was answered to each sender message."""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from cim.interfaces import IReceiptStore, MessageReceipt

_Kept = tuple[int, int, int, str, float]
"""A receipt as kept: msg_id, sent_at_ms, status, reason, forget at."""

_FAILED = 3  # cim_pb2.FAILED; DELIVERED, STORED, ACCEPTED below
_SUCCESS = frozenset((1, 2, 4))


@implementer(IReceiptStore)
class MemoryReceiptStore:
    """Receipts kept for the dedup window, then forgotten by the prune."""

    def __init__(self, clock: IReactorTime, dedup_window: float) -> None:
        self._clock = clock
        self._dedup_window = dedup_window
        # (sender, device, client_seq) -> (msg_id, sent_at_ms, status, reason, forget
        # at); insertion order is time order, so forgetting pops from the front. Flat
        # tuples of numbers and strings, not MessageReceipt objects: the garbage
        # collector stops tracking such tuples, and a window of receipts is hundreds of
        # thousands of them that every full collection would otherwise walk.
        self._receipts: OrderedDict[tuple[str, str, int], _Kept] = OrderedDict()

    def remember_message(
        self, sender: str, device: str, client_seq: int, msg_id: int, sent_at_ms: int
    ) -> Deferred[MessageReceipt | None]:
        key = (sender, device, client_seq)
        known = self._receipts.get(key)
        if known is not None and known[4] > self._clock.seconds():
            return defer.succeed(MessageReceipt(*known[:4]))
        forget_at = self._clock.seconds() + self._dedup_window
        self._receipts[key] = (msg_id, sent_at_ms, 0, "", forget_at)
        self._receipts.move_to_end(key)
        return defer.succeed(None)

    def record_outcome(
        self, sender: str, device: str, client_seq: int, status: int, reason: str
    ) -> Deferred[None]:
        key = (sender, device, client_seq)
        known = self._receipts.get(key)
        if known is not None:
            msg_id, sent_at_ms, known_status, _, forget_at = known
            if status == _FAILED and known_status in _SUCCESS:
                return defer.succeed(None)  # a stale failure never undoes a success
            self._receipts[key] = (msg_id, sent_at_ms, status, reason, forget_at)
        return defer.succeed(None)

    def forget_expired(self) -> None:
        """Drop the receipts whose dedup window has passed."""
        now = self._clock.seconds()
        receipts = self._receipts
        while receipts:
            key, kept = next(iter(receipts.items()))
            forget_at = kept[4]
            if forget_at > now:
                break
            del receipts[key]

"""The memory backend's receipts facet: what was answered to each sender message.

Every msg:R leaves a receipt for ``[state] dedup_window`` (ten minutes), so the store
holds every message of that window: at 2,000 msg/s, 1.2 million of them. Kept as one
dict entry of tuples and ints each, that was about 390 bytes a message (the churn
benchmark's RSS grew 36 % over 20,000 cycles). Here the receipts of one device are
packed in two arrays of 64-bit numbers, 32 bytes a message, in the order they came:

- ``seqs``: client sequences. A device numbers its messages upwards (the client
  library never reuses one), so a retry is found by bisection; a device that starts
  again from a lower number (reinstalled) is searched linearly until its older
  receipts have expired, correct, only slower.
- ``data``: per receipt, msg_id, sent_at_ms and ``remembered_ms << 3 | status``.

Receipts are remembered in time order, so a device's expired ones are a prefix,
skipped by moving ``head`` on every touch and cut off once they are half the arrays.
Devices are kept least recently used first; the periodic prune drops the devices
whose every receipt has expired (a device still sending trims itself). A receipt is
never forgotten before its window has passed (lookups skip expired ones exactly); one
may outlive it until its device sends again or is pruned.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections import OrderedDict

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from cim.interfaces import IImmediateReceipts, IReceiptStore, MessageReceipt

_FAILED = 3  # cim_pb2.FAILED; DELIVERED, STORED, ACCEPTED below
_SUCCESS = frozenset((1, 2, 4))
_STATUS_BITS = 3
"""cim_pb2.DeliveryStatus values are 0-4: three bits beside the time."""
_STATUS_MASK = (1 << _STATUS_BITS) - 1
_COMPACT_AFTER = 64
"""Expired receipts at the front are cut off once there are this many and they are
half the arrays: each is copied at most once more, and a quiet device is not copied
for every receipt that expires."""


class _DeviceReceipts:
    """One device's receipts within the window, packed (see the module docstring)."""

    __slots__ = ("data", "head", "ordered", "reasons", "seqs")

    def __init__(self) -> None:
        self.seqs = array("q")
        self.data = array("q")
        self.head = 0
        """Receipts before it have expired."""
        self.ordered = True
        """seqs[head:] increase strictly: a retry is found by bisection."""
        self.reasons: dict[int, str] | None = None
        """client_seq -> reason, only for the (rare) outcomes that have one."""

    def expire(self, cutoff_ms: int) -> None:
        """Skip the receipts remembered at or before ``cutoff_ms``."""
        seqs, data, head = self.seqs, self.data, self.head
        count = len(seqs)
        while head < count and data[3 * head + 2] >> _STATUS_BITS <= cutoff_ms:
            head += 1
        if head == count:
            if count:
                del seqs[:]
                del data[:]
            self.head = 0
            self.ordered = True
            self.reasons = None
            return
        if head >= _COMPACT_AFTER and 2 * head >= count:
            if self.reasons is not None:
                gone = set(seqs[:head])
                self.reasons = {s: r for s, r in self.reasons.items() if s not in gone}
            del seqs[:head]
            del data[: 3 * head]
            head = 0
        self.head = head

    def live(self, client_seq: int, cutoff_ms: int) -> int:
        """``expire(cutoff_ms)``, then ``find(client_seq)``: what every msg:R and every
        outcome asks, in one call (the expiry is nearly always nothing to do)."""
        head = self.head
        seqs = self.seqs
        if head < len(seqs) and self.data[3 * head + 2] >> _STATUS_BITS <= cutoff_ms:
            self.expire(cutoff_ms)
        elif self.ordered and (head == len(seqs) or seqs[-1] < client_seq):
            return -1  # a new message: its client sequence is past every one kept
        return self.find(client_seq)

    def find(self, client_seq: int) -> int:
        """The index of the live receipt for ``client_seq``, or -1."""
        seqs, head = self.seqs, self.head
        if self.ordered:
            index = bisect_left(seqs, client_seq, head)
            return index if index < len(seqs) and seqs[index] == client_seq else -1
        try:
            return seqs.index(client_seq, head)
        except ValueError:
            return -1

    def add(self, client_seq: int, msg_id: int, sent_at_ms: int, now_ms: int) -> None:
        seqs = self.seqs
        if self.ordered and len(seqs) > self.head and seqs[-1] >= client_seq:
            self.ordered = False
        seqs.append(client_seq)
        self.data.extend((msg_id, sent_at_ms, now_ms << _STATUS_BITS))

    def receipt(self, index: int) -> MessageReceipt:
        data = self.data
        status = data[3 * index + 2] & _STATUS_MASK
        reason = "" if self.reasons is None else self.reasons.get(self.seqs[index], "")
        return MessageReceipt(data[3 * index], data[3 * index + 1], status, reason)

    def settle(self, index: int, status: int, reason: str) -> None:
        data = self.data
        slot = 3 * index + 2
        known = data[slot] & _STATUS_MASK
        if status == _FAILED and known in _SUCCESS:
            return  # a stale failure never undoes a success
        data[slot] = (data[slot] & ~_STATUS_MASK) | (status & _STATUS_MASK)
        seq = self.seqs[index]
        if reason:
            if self.reasons is None:
                self.reasons = {}
            self.reasons[seq] = reason
        elif self.reasons is not None:
            self.reasons.pop(seq, None)

    def __len__(self) -> int:
        return len(self.seqs) - self.head


@implementer(IReceiptStore, IImmediateReceipts)
class MemoryReceiptStore:
    """Receipts kept for the dedup window, packed per device, then forgotten."""

    def __init__(self, clock: IReactorTime, dedup_window: float) -> None:
        self._clock = clock
        self._window_ms = int(dedup_window * 1000)
        # (sender, device) -> its receipts, least recently remembered first.
        self._devices: OrderedDict[tuple[str, str], _DeviceReceipts] = OrderedDict()

    def _now_ms(self) -> int:
        return int(self._clock.seconds() * 1000)

    def remember_message(
        self, sender: str, device: str, client_seq: int, msg_id: int, sent_at_ms: int
    ) -> Deferred[MessageReceipt | None]:
        return defer.succeed(
            self.remember_message_now(sender, device, client_seq, msg_id, sent_at_ms)
        )

    def remember_message_now(
        self, sender: str, device: str, client_seq: int, msg_id: int, sent_at_ms: int
    ) -> MessageReceipt | None:
        key = (sender, device)
        now_ms = int(self._clock.seconds() * 1000)
        receipts = self._devices.get(key)
        if receipts is None:
            receipts = self._devices[key] = _DeviceReceipts()
        else:
            self._devices.move_to_end(key)
            index = receipts.live(client_seq, now_ms - self._window_ms)
            if index >= 0:
                return receipts.receipt(index)
        receipts.add(client_seq, msg_id, sent_at_ms, now_ms)
        return None

    def record_outcome(
        self, sender: str, device: str, client_seq: int, status: int, reason: str
    ) -> Deferred[None]:
        self.record_outcome_now(sender, device, client_seq, status, reason)
        return defer.succeed(None)

    def record_outcome_now(
        self, sender: str, device: str, client_seq: int, status: int, reason: str
    ) -> None:
        receipts = self._devices.get((sender, device))
        if receipts is not None:
            index = receipts.live(client_seq, int(self._clock.seconds() * 1000) - self._window_ms)
            if index >= 0:
                receipts.settle(index, status, reason)

    def forget_expired(self) -> None:
        """Drop the devices all of whose receipts have passed their window.

        Least recently remembered first: the first device with a live receipt ends
        the walk (every device after it remembered something later).
        """
        cutoff_ms = self._now_ms() - self._window_ms
        devices = self._devices
        while devices:
            key, receipts = next(iter(devices.items()))
            receipts.expire(cutoff_ms)
            if len(receipts):
                break
            del devices[key]

    def __len__(self) -> int:
        """Receipts held within their window (and some past it not yet skipped)."""
        return sum(len(receipts) for receipts in self._devices.values())

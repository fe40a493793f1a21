"""What the receiving client has already handed to its application (design: 业务层面去重).

The node deduplicates retried msg:R, but a duplicate can still reach a client: the
node may send a live copy again after a reconnect, a catch-up page may bring what a
live copy already showed, a retry may land where the node's dedup window has
forgotten it (it then gets a new server id and a new place in the timeline, with the
same sender sequence). The inbox (``cim.client.inbox``) drops what is at or below a
conversation's watermark by itself; it asks a ``SeenStore`` about the rest, by server id
and by (sender, sender device, client_seq), before the application sees a message.

The memory is bounded: the last ``max_ids`` messages exactly, plus per sender device a
high-water mark (``last``, the highest sequence handed over; ``last_seq``) and a floor
(the highest sequence the store has forgotten). Past the memory, only the server id
tells: a forgotten sequence is not assumed seen.

``FileSeenStore`` keeps the same in an append-only JSON-lines file so that the
dedup survives a client restart (when the node's cursor had not moved yet, the next
catch-up brings the same messages); one client process per file.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import IO, Any, Protocol

from twisted.logger import Logger

DEFAULT_MAX_IDS = 10_000
DEFAULT_MAX_SENDERS = 10_000


class SeenStore(Protocol):
    """The inbox's memory of delivered messages; records happen on hand-over."""

    def is_duplicate(self, msg_id: int, sender: str, device: str, client_seq: int) -> bool: ...

    def record(self, msg_id: int, sender: str, device: str, client_seq: int) -> None: ...

    def last_seq(self, sender: str, device: str) -> int | None: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class _Mark:
    last: int = 0
    floor: int = 0


class MemorySeenStore:
    """Bounded dedup memory that lasts as long as the process."""

    def __init__(
        self, max_ids: int = DEFAULT_MAX_IDS, max_senders: int = DEFAULT_MAX_SENDERS
    ) -> None:
        if max_ids < 1 or max_senders < 1:
            raise ValueError("a seen store must remember at least one message and sender")
        self.max_ids = max_ids
        self.max_senders = max_senders
        self._ids: OrderedDict[int, tuple[str, str, int]] = OrderedDict()
        self._seqs: dict[tuple[str, str, int], int] = {}
        self._marks: OrderedDict[tuple[str, str], _Mark] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    def is_duplicate(self, msg_id: int, sender: str, device: str, client_seq: int) -> bool:
        if msg_id and msg_id in self._ids:
            return True
        if client_seq <= 0:
            return False  # not numbered by its sender: only the server id can tell
        # A sequence forgotten to stay within max_ids is not treated as seen: eviction
        # is shared by every sender, so a busy group could otherwise push out a device's
        # entries and make its late (resent) message look like a duplicate. Past the
        # memory, only the server id tells.
        return (sender, device, client_seq) in self._seqs

    def last_seq(self, sender: str, device: str) -> int | None:
        mark = self._marks.get((sender, device))
        return mark.last if mark is not None and mark.last else None

    def record(self, msg_id: int, sender: str, device: str, client_seq: int) -> None:
        self._remember(msg_id, sender, device, client_seq)

    def close(self) -> None:
        """Nothing to release in memory."""

    def _remember(self, msg_id: int, sender: str, device: str, client_seq: int) -> None:
        if msg_id in self._ids:
            return
        self._ids[msg_id] = (sender, device, client_seq)
        if client_seq > 0:
            self._seqs.setdefault((sender, device, client_seq), msg_id)
            mark = self._mark(sender, device)
            mark.last = max(mark.last, client_seq)
        while len(self._ids) > self.max_ids:
            _, (old_sender, old_device, old_seq) = self._ids.popitem(last=False)
            if old_seq <= 0:
                continue
            self._seqs.pop((old_sender, old_device, old_seq), None)
            old_mark = self._marks.get((old_sender, old_device))
            if old_mark is not None:
                old_mark.floor = max(old_mark.floor, old_seq)

    def _mark(self, sender: str, device: str) -> _Mark:
        key = (sender, device)
        mark = self._marks.get(key)
        if mark is None:
            mark = self._marks[key] = _Mark()
            while len(self._marks) > self.max_senders:
                self._marks.popitem(last=False)
        else:
            self._marks.move_to_end(key)
        return mark


class FileSeenStore(MemorySeenStore):
    """The same memory, replayed from an append-only JSON-lines file on start.

    Each hand-over appends one line and flushes it to the operating system (no fsync
    unless asked: a crashed process loses nothing, a crashed machine may lose the last
    lines, which then means a duplicate shown rather than a message lost). When the
    file holds ``compact_factor`` times more lines than the store remembers, it is
    rewritten from memory into a temporary file that replaces it atomically. A torn
    last line (the process died mid-write) is skipped on load.
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        max_ids: int = DEFAULT_MAX_IDS,
        max_senders: int = DEFAULT_MAX_SENDERS,
        fsync: bool = False,
        compact_factor: int = 2,
    ) -> None:
        super().__init__(max_ids, max_senders)
        self.path = path
        self._fsync = fsync
        self._compact_at = max(compact_factor, 2) * (max_ids + max_senders)
        self._lines = 0
        self.skipped_lines = 0
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        self._load()
        self._file: IO[str] | None = open(path, "a", encoding="utf-8")  # noqa: SIM115
        if self._lines > self._compact_at:
            self.compact()

    def _load(self) -> None:
        try:
            handle = open(self.path, encoding="utf-8")  # noqa: SIM115
        except FileNotFoundError:
            return
        with handle:
            for line in handle:
                self._lines += 1
                try:
                    self._apply(json.loads(line))
                except (ValueError, TypeError, KeyError):
                    self.skipped_lines += 1
        if self.skipped_lines:
            self.log.warn(
                "skipped {count} unreadable lines in {path}",
                count=self.skipped_lines,
                path=self.path,
            )

    def _apply(self, entry: Any) -> None:
        if "mark" in entry:
            sender, device = entry["mark"]
            mark = self._mark(str(sender), str(device))
            mark.last = max(mark.last, int(entry["last"]))
            mark.floor = max(mark.floor, int(entry["floor"]))
        else:
            self._remember(
                int(entry["id"]), str(entry["from"]), str(entry["device"]), int(entry["seq"])
            )

    def record(self, msg_id: int, sender: str, device: str, client_seq: int) -> None:
        if msg_id in self._ids:
            return
        self._remember(msg_id, sender, device, client_seq)
        self._write(
            [{"id": msg_id, "from": sender, "device": device, "seq": client_seq}], self._file
        )
        self._lines += 1
        if self._lines > self._compact_at:
            self.compact()

    def compact(self) -> None:
        """Rewrite the file as what memory holds: marks first, then the messages."""
        temporary = self.path + ".tmp"
        entries: list[dict[str, object]] = [
            {"mark": [sender, device], "last": mark.last, "floor": mark.floor}
            for (sender, device), mark in self._marks.items()
        ]
        entries.extend(
            {"id": msg_id, "from": sender, "device": device, "seq": seq}
            for msg_id, (sender, device, seq) in self._ids.items()
        )
        with open(temporary, "w", encoding="utf-8") as handle:
            self._write(entries, handle, always_sync=True)
        if self._file is not None:
            self._file.close()
        os.replace(temporary, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._lines = len(entries)

    def _write(
        self, entries: list[dict[str, object]], handle: IO[str] | None, always_sync: bool = False
    ) -> None:
        if handle is None:
            raise ValueError(f"the seen store {self.path} is closed")
        for entry in entries:
            handle.write(json.dumps(entry, separators=(",", ":")) + "\n")
        handle.flush()
        if self._fsync or always_sync:
            os.fsync(handle.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

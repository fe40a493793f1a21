"""One user's device as an application holds it, for the many-devices tests (#15): a
``ChatClient`` (the real client library, the real reactor) that takes whatever comes
and keeps what it was told: messages, read notices, recalls and edits, summaries.

Unlike ``tests.integration.support.frames`` (frame by frame), this is the library's
own state the tests look at: ``reads`` (unread counts, a peer's ✓✓) and
``corrections`` (messages with their recalls and edits applied).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from cim.client.corrections import Change
from cim.client.reads import ReadEvent
from cim.client.session import Backoff, ChatClient
from cim.protocols import cim_pb2
from tests.integration.support.cluster import eventually, reactor
from tests.integration.support.daemons import PASSWORD

__all__ = ["Device"]


class Device:
    """``user`` on device ``name``, logging in through ``routers`` (the first that
    answers; the library goes on to the next when one is gone)."""

    def __init__(self, routers: Sequence[str], user: str, name: str) -> None:
        self.user = user
        self.name = name
        self.messages: list[cim_pb2.Message] = []
        self.read_events: list[ReadEvent] = []
        self.changes: list[Change] = []
        self.summaries: list[cim_pb2.OfflineSummaryA] = []
        self.client = ChatClient(
            reactor,
            list(routers),
            user,
            PASSWORD,
            device=name,
            backoff=Backoff(initial=0.2, maximum=1.0),
            rng=random.Random(f"{user}/{name}"),
        )
        self.client.on_message = self._message
        self.client.on_change = self._change
        self.client.on_read = self.read_events.append
        self.client.catch_up.on_summary = self.summaries.append

    def _message(self, message: cim_pb2.Message) -> bool:
        self.messages.append(message)
        return True

    def _change(self, change: Change) -> bool:
        self.changes.append(change)
        return True

    async def start(self) -> Device:
        """Online, and its first catch-up (summary and pull) done."""
        await self.client.start(deadline=30)
        await eventually(lambda: bool(self.summaries), 30, f"{self}'s summary")
        await eventually(lambda: not self.client.catch_up.running, 30, f"{self}'s catch-up")
        return self

    async def stop(self) -> None:
        """Gone without a logout (the app closed): its cursors stay where they are."""
        await self.client.stop(logout=False)

    def __str__(self) -> str:
        return f"{self.user} on {self.name}"

    # --- what it was told ---------------------------------------------------------------

    def texts(self) -> list[str]:
        return [m.text for m in self.messages]

    def ids(self) -> list[int]:
        return [m.id for m in self.messages]

    def unread(self, conversation: str) -> int:
        return self.client.reads.unread(conversation)

    def shown(self, msg_id: int) -> cim_pb2.Message | None:
        """The message as this device shows it now (its changes applied), if handed."""
        return self.client.corrections.get(msg_id)

    def changes_of(self, msg_id: int) -> list[str]:
        return [c.event for c in self.changes if c.msg_id == msg_id]

    async def has(self, count: int, what: str, timeout: float = 30) -> None:
        await eventually(lambda: len(self.messages) >= count, timeout, f"{what} on {self}")

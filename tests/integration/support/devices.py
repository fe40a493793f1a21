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
from dataclasses import dataclass

from twisted.trial.unittest import TestCase

from cim.client.corrections import Change
from cim.client.reads import ReadEvent
from cim.client.session import Backoff, ChatClient
from cim.protocols import cim_pb2
from cim.ring import HashRing
from tests.integration.support.cluster import (
    Cluster,
    eventually,
    own_prefix_where,
    reactor,
    ring_of,
)
from tests.integration.support.daemons import PASSWORD, DaemonProcess
from tests.integration.test_reliability import shared_broker

__all__ = ["Device", "Split", "moved", "split_cluster", "splits_alice_and_bob"]


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


@dataclass
class Split:
    """Three nodes where alice and bob share a home; once it dies, alice's next node
    and bob's are two different ones, so what she does after the move reaches him over
    the bus."""

    cluster: Cluster
    home: DaemonProcess
    alice_next: DaemonProcess
    bob_next: DaemonProcess

    def routers(self, first: DaemonProcess) -> list[str]:
        """Every router, ``first`` first: the library goes on when one is gone."""
        others = [n.router_url for n in self.cluster.nodes if n is not first]
        return [first.router_url, *others]


def splits_alice_and_bob(ring: HashRing) -> bool:
    """alice and bob share a home on ``ring``, and once it is gone their next nodes
    are two different ones."""
    homes = {ring.node_for(user) for user in ("alice", "bob")}
    if len(homes) != 1 or None in homes:
        return False
    [home] = homes
    assert home is not None
    after = HashRing([node for node in ring.nodes if node != home], ring.virtual_nodes)
    return after.node_for("alice") != after.node_for("bob")


def split_cluster(test: TestCase, extra: str = "") -> Split:
    """Private ZooKeeper and Redis, the shared RabbitMQ (skipped, or failed under
    CIM_REQUIRE_SERVICES, when it is not there), three nodes with ``extra``.

    The nodes get ids of their own (another cluster on the broker at the same time
    would read queues of the same names), drawn until the ring splits alice and bob
    as ``Split`` says: where a user goes follows the node ids."""
    prefix = own_prefix_where("s", 3, splits_alice_and_bob)
    cluster = Cluster(test, count=3, amqp_url=shared_broker(test), prefix=prefix, extra=extra)
    ring = ring_of(cluster.nodes)
    assert splits_alice_and_bob(ring), cluster.nodes
    home = cluster.by_id(ring.node_for("alice").node_id)  # type: ignore[union-attr]
    after = ring_of([node for node in cluster.nodes if node is not home])
    alice_next = after.node_for("alice").node_id  # type: ignore[union-attr]
    bob_next = after.node_for("bob").node_id  # type: ignore[union-attr]
    cluster.start(["alice", "bob"])
    return Split(cluster, home, cluster.by_id(alice_next), cluster.by_id(bob_next))


async def moved(device: Device, node: DaemonProcess, timeout: float = 60) -> None:
    """``device`` logged in again by itself and is online on ``node``."""

    def there() -> bool:
        ticket = device.client.ticket
        return (
            device.client.state == "online"
            and ticket is not None
            and ticket.node.node_id == node.node_id
        )

    await eventually(there, timeout, f"{device} online on {node.node_id}")

"""The IM node's rooms, built once and wired together, and the frame table they answer.

Each room answers one family of frames and says which in its ``frame_table()``; the
node merges them into ``inbound``, the table an authenticated connection dispatches
through (cim.protocols.im): the connection parses a frame and calls the room's
function with itself and the message. A new frame type goes into the room of its
family (or a new room, merged into ``inbound`` below).

    sessions   who is connected here (user -> {device: session}): arrivals, kicks,
               route refresh, shutdown; DEVICES_R
    routing    1:1 live copies: route / forward, pending acks, tell the sender,
               what other nodes send over the bus
    direct     msg:R (every message's claim), ack:R
    groups     group posts: membership, live copies in order; GROUP_R
    catchup    OFFLINE_SUMMARY_R, OFFLINE_R, OFFLINE_ACK_R (timelines), the notice to pull
    receipts   READ_R, READERS_R: read marks, READ_N to the user's devices and a 1:1 peer
    history    HISTORY_R
    changes    CHANGE_R: recall and edit, entries in the timelines spread like messages
    presence   ONLINE_R (the caller's contacts and bound accounts only)
    contacts   CONTACTS_R; the contact rules direct, presence and groups ask
    typing     TYPING_R: live "typing" / "stopped" notices, never stored
    system     server-made messages (the logic service's notices)

and whatever rooms the daemon adds from outside (PUSH_R: cim.push.frames).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cim.im.catchup import Catchup
from cim.im.changes import MessageChanges
from cim.im.collaborators import (
    NO_BOUNDS,
    Bounds,
    Connected,
    Directory,
    FrameEntry,
    FrameTable,
    NodeCore,
    Stores,
)
from cim.im.contacts import ContactRequests
from cim.im.direct import DirectMessages
from cim.im.groups import GroupMessages
from cim.im.history import HistoryRequests
from cim.im.peers import Peers
from cim.im.presence import PresenceRequests
from cim.im.receipts import ReadReceipts
from cim.im.routing import Routing
from cim.im.sessions import Sessions
from cim.im.system import SystemMessages
from cim.im.typing_notices import TypingNotices
from cim.limits.messages import MessageGate

__all__ = ["ImNode", "Room"]


class Room(Protocol):
    def frame_table(self) -> FrameTable:
        """The frame types this room answers, each with its class and function."""


class ImNode:
    """Builds the rooms from the node's collaborators; holds what the outside uses."""

    def __init__(
        self,
        core: NodeCore,
        directory: Directory,
        stores: Stores,
        peers: Peers,
        bounds: Bounds = NO_BOUNDS,
        more_rooms: Sequence[Room] = (),
    ) -> None:
        """``more_rooms``: rooms outside cim.im whose frames the connection answers
        too (PUSH_R, cim.push.frames)."""
        self.core = core
        self.directory = directory
        self.stores = stores
        self.peers = peers
        connected = self.connected = Connected()
        self.catchup = Catchup(core, stores, peers, connected)
        self.routing = Routing(core, directory, peers, connected, self.catchup)
        self.groups = GroupMessages(core, directory, peers, connected, self.routing, bounds)
        self.gate = MessageGate(
            core.clock,
            bounds.limits,
            backlog=self.groups.backlog_refusal,
            store_wait=lambda: stores.timeline.behind(),
        )
        self.direct = DirectMessages(
            core, directory, self.routing, self.groups, stores, self.gate, bounds.max_text_length
        )
        self.history = HistoryRequests(stores)
        self.changes = MessageChanges(
            core, directory, stores, peers, connected, self.routing, self.gate, bounds
        )
        self.presence = PresenceRequests(core.state.presence, directory)
        self.contacts = ContactRequests(directory)
        self.system = SystemMessages(core, stores, self.catchup)
        self.typing = TypingNotices(core, directory, peers, connected)
        self.routing.bus_bodies["typing"] = self.typing.bus_typing_received
        self.sessions = Sessions(core, connected, self.routing, stores, bounds.max_devices_per_user)
        self.receipts = ReadReceipts(core, stores, peers, connected)
        self.routing.bus_bodies["read"] = self.receipts.read_from_bus
        peers.listen(self.routing.bus_message_received)
        self.inbound: FrameTable = _merged(
            self.direct,
            self.groups,
            self.catchup,
            self.history,
            self.presence,
            self.contacts,
            self.typing,
            self.changes,
            self.receipts,
            self.sessions,
            *more_rooms,
        )
        """What an authenticated client may send: every other frame type closes the
        connection."""


def _merged(*rooms: Room) -> FrameTable:
    table: dict[int, FrameEntry] = {}
    for room in rooms:
        for frame_type, entry in room.frame_table().items():
            if frame_type in table:
                raise ValueError(f"frame type {frame_type} is answered by two rooms")
            table[frame_type] = entry
    return table

"""Read receipts (issue #15): READ_R, READERS_R, and the READ_N notices they cause.

A user marks a conversation read up to a seq from one device (READ_R). Once the mark
is durable (cim.storage.read_marks) the device gets READ_A, and:

- the user's other online devices get READ_N (``reader`` is the user itself) with the
  conversation's newest seq, so their unread counts drop at once; a device offline
  then learns it from the next catch-up summary, whose counts are past the mark;
- in a 1:1, the peer's online devices get READ_N (``reader`` is the user) when what
  the user lets others see moved: never while the user's ``read_receipts`` setting is
  off; a peer device offline then finds it in its summary (``peer_read_seq``).

A mark past the conversation's newest seq, for a conversation that is not the user's,
or of seq 0 is refused with ERROR (BAD_REQUEST or FORBIDDEN, naming READ_R and its
request id) and changes nothing; a mark below the current one changes nothing and is
answered with the mark in effect (``moved`` false).

In a group, a message's sender asks who has read it (READERS_R): the count, the
members it could count (those who were members when it was sent, the sender left
out) and the names. Only the sender may ask; any other member is FORBIDDEN, since
what a member read is shown to the one whose message it was, not to everyone.

A peer connected to another node is reached over the bus (BusRead), as the other live
notices are (cim.im.catchup's OfflineReady): nothing is lost when the bus cannot
take it, the peer's next summary carries the mark.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.history.timeline import TimelineUnavailable
from cim.im.catchup import UNAVAILABLE_RETRY_MS
from cim.im.collaborators import (
    ClientSession,
    Connected,
    FrameTable,
    NodeCore,
    Stores,
    log_failure,
)
from cim.im.peers import Peers
from cim.interfaces import BusUnavailable, StateUnavailable
from cim.protocols import cim_pb2
from cim.storage.read_marks import Readers, ReadMark, ReadRefused

__all__ = ["ReadReceipts"]

READ_A = cim_pb2.READ_A
READ_N = cim_pb2.READ_N
READERS_A = cim_pb2.READERS_A
ERROR = cim_pb2.ERROR

_CODES = {
    "forbidden": cim_pb2.Error.FORBIDDEN,
    "not_found": cim_pb2.Error.BAD_REQUEST,
    "bad_request": cim_pb2.Error.BAD_REQUEST,
}


class ReadReceipts:
    """READ_R and READERS_R, and READ_N to whoever must learn of a mark."""

    log = Logger()

    def __init__(self, core: NodeCore, stores: Stores, peers: Peers, connected: Connected) -> None:
        self._node_id = core.node_id
        self._stores = stores
        self._peers = peers
        self._connected = connected

    def frame_table(self) -> FrameTable:
        return {
            cim_pb2.READ_R: (cim_pb2.ReadR, self.read_requested),
            cim_pb2.READERS_R: (cim_pb2.ReadersR, self.readers_requested),
        }

    # --- a device's requests ----------------------------------------------------------

    def read_requested(self, session: ClientSession, request: cim_pb2.ReadR) -> None:
        user = session.record.user
        d = self._stores.read_marks.mark(user, request.conversation, request.seq)
        d.addCallback(self._marked, session, request.request_id)
        d.addErrback(self._refused, session, cim_pb2.READ_R, request.request_id)
        d.addErrback(log_failure, self.log, "answer a read mark")

    def _marked(self, mark: ReadMark, session: ClientSession, request_id: int) -> None:
        session.deliver(
            READ_A,
            cim_pb2.ReadA(
                request_id=request_id,
                conversation=mark.conversation,
                seq=mark.seq,
                moved=mark.moved,
                last_seq=mark.last_seq,
            ),
        )
        if mark.moved:
            own = cim_pb2.ReadNotice(
                conversation=mark.conversation,
                reader=mark.user,
                seq=mark.seq,
                last_seq=mark.last_seq,
                peer=mark.peer or "",
                group=mark.group_id or "",
            )
            for device in self._connected.devices_of(mark.user):
                if device is not session:
                    device.deliver(READ_N, own)
        if mark.shown_moved and mark.peer:
            seen = cim_pb2.ReadNotice(
                conversation=mark.conversation,
                reader=mark.user,
                seq=mark.shown_seq,
                peer=mark.user,  # the other side of the conversation, as the peer sees it
            )
            self.tell(mark.peer, seen)

    def readers_requested(self, session: ClientSession, request: cim_pb2.ReadersR) -> None:
        user = session.record.user
        d = self._stores.read_marks.readers(user, request.conversation, request.seq)
        d.addCallback(self._readers, session, request.request_id)
        d.addErrback(self._refused, session, cim_pb2.READERS_R, request.request_id)
        d.addErrback(log_failure, self.log, "answer who read a message")

    def _readers(self, found: Readers, session: ClientSession, request_id: int) -> None:
        session.deliver(
            READERS_A,
            cim_pb2.ReadersA(
                request_id=request_id,
                conversation=found.conversation,
                seq=found.seq,
                count=found.count,
                readers=found.readers,
                members=found.members,
            ),
        )

    def _refused(
        self, failure: Failure, session: ClientSession, request_type: int, request_id: int
    ) -> None:
        """A refusal says why and changes nothing; a database that fails says "again"."""
        error = cim_pb2.Error(request_type=request_type, request_id=request_id)  # type: ignore[arg-type]
        if failure.check(ReadRefused):
            refusal: ReadRefused = failure.value  # type: ignore[assignment]
            error.code = _CODES.get(refusal.code, cim_pb2.Error.BAD_REQUEST)
            error.message = refusal.message
        else:
            if not failure.check(TimelineUnavailable):
                self.log.warn(
                    "could not take a read request ({why})", why=failure.getErrorMessage()
                )
            error.code = cim_pb2.Error.UNAVAILABLE
            error.message = "read marks cannot be kept right now; ask again"
            error.retry_after_ms = UNAVAILABLE_RETRY_MS
        session.deliver(ERROR, error)

    # --- telling ----------------------------------------------------------------------

    def tell(self, user: str, notice: cim_pb2.ReadNotice) -> Deferred[None]:
        """READ_N to ``user``'s devices: here, or on the node its route names."""
        here = self._connected.devices_of(user)
        for device in here:
            device.deliver(READ_N, notice)
        if here:
            return succeed(None)
        peers = self._peers

        async def forward() -> None:
            node = await peers.node_of(user)
            if node is None or node == self._node_id or not peers.is_alive(node):
                return  # offline: its next summary carries the mark
            envelope = cim_pb2.BusEnvelope(
                origin_node=self._node_id,
                read=cim_pb2.BusRead(receivers=[user], notice=notice),
            )
            await peers.publish(node, envelope)

        d = Deferred.fromCoroutine(forward())
        # Not telling is not losing: the peer's next summary carries the mark.
        d.addErrback(lambda failure: failure.trap(BusUnavailable, StateUnavailable))
        d.addErrback(log_failure, self.log, "forward a read notice")
        return d

    def read_from_bus(self, body: cim_pb2.BusRead) -> None:
        """Another node's READ_N for users it found connected here."""
        for receiver in body.receivers:
            for device in self._connected.devices_of(receiver):
                device.deliver(READ_N, body.notice)

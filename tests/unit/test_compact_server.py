"""The IM port's TCP connections (cim.protocols.compact): what Twisted's would say,
made when asked instead of kept per connection (issue #20)."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cim.protocols.compact import CompactServer
from cim.services.tree import _ReportedEndpoint


class _Port:
    """The listening port as a server connection reads it."""

    _realPortNumber = 5222


class _Recording(Protocol):
    def __init__(self) -> None:
        self.lost: list[Failure] = []

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:  # noqa: B008
        self.lost.append(reason)


class _Named(_Recording):
    """A protocol whose log prefix changes (Twisted asks ``ILoggingContext`` each time)."""

    name = "-"

    def logPrefix(self) -> str:
        return self.name


class CompactServerTests(SynchronousTestCase):
    def connection(self, cls: type[tcp.Server]) -> tuple[Any, _Recording]:
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        self.addCleanup(ours.close)
        protocol = _Recording()
        port: Any = _Port()
        server = cls(ours, protocol, ("10.0.0.7", 40001), port, 12, MemoryReactor())
        protocol.makeConnection(server)
        return server, protocol

    def test_it_says_what_twisteds_server_says(self) -> None:
        compact, _ = self.connection(CompactServer)
        twisted, _ = self.connection(tcp.Server)
        self.assertEqual(compact.logPrefix(), twisted.logPrefix())
        self.assertEqual(repr(compact), repr(twisted))
        self.assertEqual(compact.logPrefix(), "_Recording,12,10.0.0.7")
        self.assertEqual(compact.fileno(), compact.socket.fileno())

    def test_a_protocol_with_its_own_prefix_is_asked_every_time(self) -> None:
        compact, protocol = self.connection(CompactServer)
        self.assertEqual(compact.logPrefix(), "_Recording,12,10.0.0.7")  # remembered
        own = _Named()
        compact.protocol = own
        own.name = "alice"
        self.assertEqual(compact.logPrefix(), "alice,12,10.0.0.7")
        own.name = "bob"
        self.assertEqual(compact.logPrefix(), "bob,12,10.0.0.7")
        compact.protocol = protocol
        self.assertEqual(compact.logPrefix(), "_Recording,12,10.0.0.7")

    def test_it_keeps_none_of_the_three_per_connection(self) -> None:
        compact, _ = self.connection(CompactServer)
        twisted, _ = self.connection(tcp.Server)
        kept = {"logstr", "repstr", "fileno"}
        self.assertEqual(kept & set(vars(twisted)), kept)
        self.assertEqual(kept & set(vars(compact)), set())

    def test_twisteds_write_buffer_is_a_list_only_while_it_holds_bytes(self) -> None:
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        self.addCleanup(ours.close)
        ours.setblocking(False)
        protocol = _Recording()
        compact = CompactServer(ours, protocol, ("10.0.0.7", 40001), _Port(), 12, MemoryReactor())  # type: ignore[arg-type]
        protocol.makeConnection(compact)
        self.assertNotIn("_tempDataBuffer", vars(compact))
        self.assertIsNone(compact._pending_writes)
        compact.write(b"one ")
        compact.writeSequence([b"two ", b"three"])
        self.assertEqual(compact._pending_writes, [b"one ", b"two ", b"three"])
        self.assertEqual(compact._tempDataLen, 13)
        compact.doWrite()
        self.assertIsNone(compact._pending_writes)
        self.assertEqual(compact._tempDataLen, 0)
        self.assertEqual(theirs.recv(100), b"one two three")

    def test_a_lost_connection_closes_like_twisteds(self) -> None:
        compact, protocol = self.connection(CompactServer)
        compact.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(protocol.lost), 1)
        self.assertEqual(compact.fileno(), -1)
        self.assertFalse(hasattr(compact, "socket"))
        self.assertEqual(compact.logPrefix(), "-,12,10.0.0.7")
        self.assertEqual(repr(compact), "<- #12 on 5222>")


class ListenerTests(SynchronousTestCase):
    def test_the_port_builds_its_connections_of_the_class_given(self) -> None:
        port = tcp.Port(0, Factory(), reactor=MemoryReactor())

        class Endpoint:
            def listen(self, factory: Any) -> Any:
                return succeed(port)

        _ReportedEndpoint(Endpoint(), CompactServer).listen(Factory())
        self.assertIs(port.transport, CompactServer)

    def test_without_a_class_the_port_keeps_twisteds(self) -> None:
        port = tcp.Port(0, Factory(), reactor=MemoryReactor())

        class Endpoint:
            def listen(self, factory: Any) -> Any:
                return succeed(port)

        _ReportedEndpoint(Endpoint()).listen(Factory())
        self.assertIs(port.transport, tcp.Server)

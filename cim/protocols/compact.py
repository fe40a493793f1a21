"""Twisted's TCP server connection without the per-connection objects it makes up front.

``twisted.internet.tcp.Server`` formats two strings for every accepted connection
(``logstr``, the log prefix; ``repstr``, its repr) and keeps a bound ``fileno`` method
of its socket: about 0.2 KiB of the 3 KiB an idle IM connection may cost (issue #20),
for text read only when something is logged about the connection. ``CompactServer``
makes them when asked instead. Nor does it keep Twisted's write buffer list (an empty
list in every connection, though cim writes to the socket itself and Twisted's buffer
holds bytes only while the socket is full) except while it holds something.
``Port.transport`` is the documented class a port builds its connections with; the IM
listener sets it (``cim.services.tree.Listener``).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

__all__ = ["CompactServer"]

_CLASS_PREFIXES: dict[type, str] = {}
"""Protocol classes whose log prefix is their name (``Protocol.logPrefix``)."""


class _Unkept:
    """An attribute Twisted's ``__init__`` sets on every connection that CompactServer
    makes when asked (by a method of its own): the value set is dropped before it takes
    a place in the instance, and reading it fails as for an attribute never set."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        raise AttributeError(self._name)

    def __set__(self, instance: object, value: object) -> None:
        pass

    def __delete__(self, instance: object) -> None:
        pass


class CompactServer(tcp.Server):
    """A ``tcp.Server`` whose log prefix, repr and ``fileno`` are made when asked, and
    whose write buffer list exists only while it holds something."""

    # Assigned by tcp.Server.__init__ and never kept: logPrefix and __repr__ make them.
    # (A deleted instance attribute would still take a place in every connection's
    # values, 8 bytes each, once any connection had set it.)
    logstr = _Unkept()
    repstr = _Unkept()

    # Twisted's _tempDataBuffer (FileDescriptor.write appends to it, doWrite empties
    # it into dataBuffer): None while empty, so an idle connection holds no list.
    __slots__ = ("_pending_writes",)
    _pending_writes: list[bytes] | None

    def __init__(
        self,
        sock: socket.socket,
        protocol: Any,
        client: tuple[Any, ...],
        server: tcp.Port,
        sessionno: int,
        reactor: Any,
    ) -> None:
        super().__init__(sock, protocol, client, server, sessionno, reactor)
        # Back to the class's: the method below makes the same value when asked.
        del self.fileno

    @property
    def _tempDataBuffer(self) -> list[bytes]:
        pending = self._pending_writes
        if pending is None:
            pending = self._pending_writes = []
        return pending

    @_tempDataBuffer.setter
    def _tempDataBuffer(self, value: list[bytes]) -> None:
        # FileDescriptor sets [] at start and after each doWrite: the list goes then.
        self._pending_writes = value or None

    def fileno(self) -> int:
        # Twisted's own is the socket's bound method, deleted when the connection is
        # lost, after which FileDescriptor.fileno says -1; so does this.
        sock: socket.socket | None = getattr(self, "socket", None)
        return sock.fileno() if sock is not None else -1

    def connectionLost(self, reason: Failure) -> None:
        if hasattr(self, "socket"):
            # tcp.Connection.connectionLost deletes the instance's fileno.
            self.fileno = self.socket.fileno  # type: ignore[method-assign]
        super().connectionLost(reason)

    def logPrefix(self) -> str:
        # Asked for every event the reactor hands this connection (callWithLogger),
        # not only when something is logged: the protocol's part is remembered per
        # protocol class when that class keeps Twisted's own (its name).
        protocol = getattr(self, "protocol", None)
        if protocol is None:
            return f"-,{self.sessionno},{self.hostname}"
        kind = type(protocol)
        known = _CLASS_PREFIXES.get(kind)
        if known is not None:
            return f"{known},{self.sessionno},{self.hostname}"
        prefix = self._getLogPrefix(protocol)
        if getattr(kind, "logPrefix", None) is Protocol.logPrefix:
            _CLASS_PREFIXES[kind] = prefix
        return f"{prefix},{self.sessionno},{self.hostname}"

    def __repr__(self) -> str:
        protocol = getattr(self, "protocol", None)
        name = protocol.__class__.__name__ if protocol is not None else "-"
        return f"<{name} #{self.sessionno} on {self.server._realPortNumber}>"

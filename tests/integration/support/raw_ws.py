"""A blocking WebSocket client on a plain socket, and the cim connection over it.

Written out (RFC 6455 client framing is a page) rather than taken from a library so a
test controls every byte: a text message, a 1 MiB message, ten thousand pings, or a
client that never reads. ``RawWsClient`` is ``raw_client.RawClient`` on the gateway:
the client library's handshake and ciphers, one binary message per cim frame.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import struct
import time
from urllib.parse import urlsplit

from google.protobuf.message import Message as ProtobufMessage

from cim.config.values import SUITE_CHACHA
from cim.protocols import cim_pb2
from cim.protocols.handshake import ClientHandshake
from tests.integration.support.raw_client import login

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


class UpgradeRefused(Exception):
    def __init__(self, status: int, head: str) -> None:
        super().__init__(status, head)
        self.status = status


class Closed(Exception):
    """The server closed: the close frame's code (None when the TCP connection ended)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class RawWebSocket:
    def __init__(
        self,
        url: str,
        origin: str | None = None,
        receive_buffer: int = 0,
        timeout: float = 10,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``tls``: for ``wss://``, the context that trusts the node's certificate."""
        parts = urlsplit(url)
        plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer:
            plain.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        plain.settimeout(timeout)
        plain.connect((parts.hostname or "127.0.0.1", parts.port or 80))
        plain.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = plain
        if parts.scheme == "wss":
            assert tls is not None, "wss:// needs a TLS context"
            self.sock = tls.wrap_socket(plain, server_hostname=parts.hostname)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {parts.path or '/'} HTTP/1.1",
            f"Host: {parts.netloc}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if origin is not None:
            lines.append(f"Origin: {origin}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._buffer = b""
        while b"\r\n\r\n" not in self._buffer:
            self._fill()
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            raise UpgradeRefused(status, head.decode("latin-1"))

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise Closed(None, "connection ended")
        self._buffer += data

    def send_frame(self, opcode: int, payload: bytes) -> None:
        """One final frame, masked with a zero key (valid, and no copy of the payload)."""
        length = len(payload)
        if length < 126:
            header = struct.pack(">BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            header = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, length)
        self.sock.sendall(header + b"\x00\x00\x00\x00" + payload)

    def send_binary(self, payload: bytes) -> None:
        self.send_frame(BINARY, payload)

    def read_frame(self) -> tuple[int, bytes]:
        while len(self._buffer) < 2:
            self._fill()
        first, second = self._buffer[0], self._buffer[1]
        length = second & 0x7F
        offset = 2
        if length == 126:
            while len(self._buffer) < 4:
                self._fill()
            (length,) = struct.unpack_from(">H", self._buffer, 2)
            offset = 4
        elif length == 127:
            while len(self._buffer) < 10:
                self._fill()
            (length,) = struct.unpack_from(">Q", self._buffer, 2)
            offset = 10
        while len(self._buffer) < offset + length:
            self._fill()
        payload = self._buffer[offset : offset + length]
        self._buffer = self._buffer[offset + length :]
        return first & 0x0F, payload

    def read_message(self) -> bytes:
        """The next binary message; pongs are skipped, a close frame raises Closed."""
        while True:
            opcode, payload = self.read_frame()
            if opcode == BINARY:
                return payload
            if opcode == CLOSE:
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                raise Closed(code, payload[2:].decode("utf-8", "replace"))
            if opcode == TEXT:
                raise AssertionError("the gateway sent a text message")

    def close(self) -> None:
        self.sock.close()


class RawWsClient:
    """One logged-in cim connection over the gateway; reading is the caller's."""

    def __init__(
        self,
        router_url: str,
        user: str,
        device: str = "browser",
        origin: str | None = None,
        receive_buffer: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        ticket = login(router_url, user)
        if not ticket.node.ws_url:
            raise AssertionError("the router handed out no WebSocket URL")
        self.user = user
        self.ws = RawWebSocket(ticket.node.ws_url, origin, receive_buffer, tls=tls)
        handshake = ClientHandshake(
            ticket.server_key,
            ticket.token,
            device,
            SUITE_CHACHA,
            (SUITE_CHACHA,),
            int(time.time() * 1000),
        )
        self.ws.send_binary(handshake.hello_body())
        reply = self.ws.read_message()
        self.sealer, self.opener, first = handshake.finish(reply)
        result = cim_pb2.LoginResult.FromString(first[1:])
        if result.status != cim_pb2.LoginResult.OK:
            raise ConnectionError(f"login refused: {result.message}")
        self.ws.sock.settimeout(None)

    def send(self, frame_type: int, message: ProtobufMessage) -> None:
        self.ws.send_binary(self.sealer.seal(bytes((frame_type,)) + message.SerializeToString()))

    def heartbeat(self) -> None:
        self.ws.send_binary(b"")

    def read(self) -> tuple[int, bytes] | None:
        """The next frame opened: (type, protobuf bytes), None for a heartbeat."""
        body = self.ws.read_message()
        if not body:
            return None
        plaintext = self.opener.open(body)
        return plaintext[0], plaintext[1:]

    def close(self) -> None:
        self.ws.close()

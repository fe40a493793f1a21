"""A blocking IM client on a plain socket: the client library's handshake and ciphers,
and nothing else, so a test decides exactly when (and whether) it reads.

Run as a program it is the flooding sender of tests/integration/test_backpressure.py,
in its own process so its sealing loop does not share a GIL with the test's canary:

    python -m tests.integration.support.raw_client ROUTER_URL USER TO RATE SECONDS SIZE [PROGRESS]

It logs in, sends msg:R of SIZE bytes of text to TO at RATE a second for SECONDS,
reads every answer, and prints one JSON line: the client_seqs the node took (msg:A),
the outcomes (ack:N) by status, and the refusals. With PROGRESS (a file made by
``FloodProgress``) it keeps its two counts there as it goes, so the test can say where
the flood stood at any moment of its own (when a canary message was sent, delivered).
"""

from __future__ import annotations

import json
import mmap
import socket
import struct
import sys
import threading
import time
import urllib.request
from typing import Any

from google.protobuf.message import Message as ProtobufMessage

from cim.client.router import LoginTicket, parse_ticket
from cim.config.values import SUITE_CHACHA
from cim.protocols import cim_pb2
from cim.protocols.handshake import ClientHandshake

PASSWORD = "correct horse battery"
_LENGTH = struct.Struct(">I")
HEARTBEAT = b"\x00\x00\x00\x00"


def login(router_url: str, user: str, password: str = PASSWORD) -> LoginTicket:
    request = urllib.request.Request(
        f"{router_url}/api/v1/login",
        data=json.dumps({"user": user, "password": password}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return parse_ticket(json.loads(response.read()))


class RawClient:
    """One logged-in IM connection; ``send`` is thread-safe, reading is the caller's."""

    def __init__(
        self, router_url: str, user: str, device: str = "raw", receive_buffer: int = 0
    ) -> None:
        ticket = login(router_url, user)
        self.user = user
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer:
            # Before connecting, so the window the node sees is small from the start.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(10)
        self.sock.connect((ticket.node.host, ticket.node.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handshake = ClientHandshake(
            ticket.server_key,
            ticket.token,
            device,
            SUITE_CHACHA,
            (SUITE_CHACHA,),
            int(time.time() * 1000),
        )
        self._buffer = b""
        self._lock = threading.Lock()
        self._write(handshake.hello_body())
        reply = self.read_body()
        if reply is None:
            raise ConnectionError("heartbeat instead of the handshake reply")
        self.sealer, self.opener, first = handshake.finish(reply)
        result = cim_pb2.LoginResult.FromString(first[1:])
        if result.status != cim_pb2.LoginResult.OK:
            raise ConnectionError(f"login refused: {result.message}")
        self.sock.settimeout(None)

    def _write(self, body: bytes) -> None:
        self.sock.sendall(_LENGTH.pack(len(body)) + body)

    def send(self, frame_type: int, message: ProtobufMessage) -> None:
        with self._lock:
            body = self.sealer.seal(bytes((frame_type,)) + message.SerializeToString())
            self.sock.sendall(_LENGTH.pack(len(body)) + body)

    def heartbeat(self) -> None:
        with self._lock:
            self.sock.sendall(HEARTBEAT)

    def read_body(self) -> bytes | None:
        """The next frame's body (None for a heartbeat); ConnectionError at the end."""
        while len(self._buffer) < 4:
            self._fill()
        (length,) = _LENGTH.unpack_from(self._buffer)
        while len(self._buffer) < 4 + length:
            self._fill()
        body = self._buffer[4 : 4 + length]
        self._buffer = self._buffer[4 + length :]
        return body if length else None

    def read(self) -> tuple[int, bytes] | None:
        """The next frame opened: (type, protobuf bytes), None for a heartbeat."""
        body = self.read_body()
        if body is None:
            return None
        plaintext = self.opener.open(body)
        return plaintext[0], plaintext[1:]

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("closed by the node")
        self._buffer += data

    def close(self) -> None:
        self.sock.close()


class FloodProgress:
    """Two counts the flooding process keeps in a shared file: messages it has sent
    (written to its socket) and messages the node has taken (msg:A read).

    Each count is written by one thread of the flooder and only ever grows; a reader
    takes two equal reads of a count as its value, so a torn read is never seen.
    """

    _SENT, _TAKEN = 0, 8

    def __init__(self, path: str, create: bool = False) -> None:
        self.path = path
        if create:
            with open(path, "wb") as empty:
                empty.write(bytes(16))
        with open(path, "r+b") as shared:
            self._map = mmap.mmap(shared.fileno(), 16)

    def sent(self, count: int) -> None:
        struct.pack_into("<Q", self._map, self._SENT, count)

    def taken(self, count: int) -> None:
        struct.pack_into("<Q", self._map, self._TAKEN, count)

    def _read(self, offset: int) -> int:
        while True:
            (first,) = struct.unpack_from("<Q", self._map, offset)
            (second,) = struct.unpack_from("<Q", self._map, offset)
            if first == second:
                return int(first)

    def now(self) -> tuple[int, int]:
        """(sent, taken) as they stand: taken first, so taken <= sent."""
        taken = self._read(self._TAKEN)
        return self._read(self._SENT), taken


def flood(
    router_url: str,
    user: str,
    to: str,
    rate: float,
    seconds: float,
    size: int,
    progress_path: str | None = None,
) -> None:
    client = RawClient(router_url, user, device="flood")
    progress = FloodProgress(progress_path) if progress_path else None
    taken: list[int] = []
    outcomes: dict[str, int] = {}
    refused: dict[str, int] = {}

    def read_answers() -> None:
        while True:
            try:
                frame = client.read()
            except (ConnectionError, OSError):
                return
            if frame is None:
                continue
            kind, payload = frame
            if kind == cim_pb2.MSG_A:
                taken.append(cim_pb2.MsgA.FromString(payload).client_seq)
                if progress is not None:
                    progress.taken(len(taken))
            elif kind == cim_pb2.ACK_N:
                status = cim_pb2.DeliveryStatus.Name(cim_pb2.AckN.FromString(payload).status)
                outcomes[status] = outcomes.get(status, 0) + 1
            elif kind == cim_pb2.ERROR:
                code = cim_pb2.Error.Code.Name(cim_pb2.Error.FromString(payload).code)
                refused[code] = refused.get(code, 0) + 1

    reader = threading.Thread(target=read_answers, daemon=True)
    reader.start()
    text = "x" * size
    start = time.monotonic()
    seq = 0
    try:
        while time.monotonic() - start < seconds:
            seq += 1
            client.send(cim_pb2.MSG_R, cim_pb2.Message(to=to, text=text, client_seq=seq))
            if progress is not None:
                progress.sent(seq)
            ahead = start + seq / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    except OSError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
    # The last answers: a bounded wait for msg:A of everything sent.
    deadline = time.monotonic() + 30
    while len(taken) + sum(refused.values()) < seq and time.monotonic() < deadline:
        client.heartbeat()
        time.sleep(0.5)
    time.sleep(1)
    result: dict[str, Any] = {
        "sent": seq,
        "taken": sorted(taken),
        "outcomes": outcomes,
        "refused": refused,
        "seconds": time.monotonic() - start,
    }
    print(json.dumps(result), flush=True)
    client.close()


if __name__ == "__main__":
    url, sender, receiver, per_second, duration, text_size = sys.argv[1:7]
    shared = sys.argv[7] if len(sys.argv) > 7 else None
    flood(url, sender, receiver, float(per_second), float(duration), int(text_size), shared)

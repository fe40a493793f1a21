"""Protocol test vectors from the Python implementation, for clients in other languages.

``python -m tests.vectors.protocol`` writes ``tests/vectors/protocol.json`` and the
"Test vectors: a whole session" section of ``docs/protocol.md``; ``--check`` only says
whether both are current (``tests/unit/test_protocol_vectors.py`` runs it). The
TypeScript SDK's tests (``clients/js/test/vectors.test.ts``) check its handshake and
frames byte for byte against the JSON, so the two implementations cannot drift apart.

Everything is computed by the real code (``cim.protocols.handshake``, ``crypto``,
``wire``'s framing) from fixed inputs. Two things cannot be recomputed: the RSA key
(generated once, kept in the JSON) and the RSA-OAEP ``sealed_key`` (OAEP is
randomised). A regeneration keeps both when the key still decrypts the sealed key
material to the same bytes, so the file only changes when the protocol does.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from collections.abc import Callable, Iterator
from typing import Any

from cryptography.hazmat.primitives import serialization
from google.protobuf import json_format
from google.protobuf.message import Message as ProtobufMessage

from cim.protocols import cim_pb2
from cim.protocols.crypto import SUITE_CHACHA, SUITE_RC4, NodeKey
from cim.protocols.handshake import (
    ClientHandshake,
    Resumption,
    accept_client_hello,
    hello_digest,
)
from cim.protocols.resumption import TICKET_KEY_LABEL, Tickets, next_resumption_secret

HERE = os.path.dirname(os.path.abspath(__file__))
JSON_PATH = os.path.join(HERE, "protocol.json")
DOC_PATH = os.path.join(HERE, "..", "..", "docs", "protocol.md")
BEGIN = "<!-- protocol vectors: begin (python -m tests.vectors.protocol) -->"
END = "<!-- protocol vectors: end -->"

SECRET = bytes(range(0x00, 0x20))
CLIENT_NONCE = bytes(range(0x40, 0x50))
SERVER_NONCE = bytes(range(0x80, 0x90))
TOKEN = "tok-" + "A" * 39  # a router token is 43 characters
DEVICE = "web-1"
TIMESTAMP_MS = 1_796_000_000_000
RESUME_CLIENT_NONCE = bytes(range(0x50, 0x60))
RESUME_SERVER_NONCE = bytes(range(0x90, 0xA0))
TICKET_RANDOM = (bytes(range(0xC0, 0xD0)), bytes(range(0xD0, 0xDC)))
"""The ticket id and its AEAD nonce (the ticket is opaque to clients; fixed here so the
vectors do not change)."""
RESUME_WINDOW_MS = 600_000
OFFERED = [SUITE_CHACHA]
"""What the JS SDK offers (ChaCha20-Poly1305 only); the second case offers both."""

# Frames after the handshake: (direction, frame type, message). Client -> node first
# counter 0; node -> client counter 1 (its 0 was the LoginResult).
CLIENT_FRAMES: list[tuple[int, ProtobufMessage]] = [
    (
        cim_pb2.MSG_R,
        cim_pb2.Message(
            to="bob",
            text="hello, bob \u2603",
            client_seq=1_796_000_000_000_001,
            prev_seq=0,
            client_time_ms=TIMESTAMP_MS,
        ),
    ),
    (
        cim_pb2.ACK_R,
        cim_pb2.AckR(msg_id=387923101993668608, conversation="d:alice:bob", through_seq=7),
    ),
    (cim_pb2.OFFLINE_SUMMARY_R, cim_pb2.OfflineSummaryR(request_id=1, max_bytes=1 << 20)),
    (
        cim_pb2.OFFLINE_R,
        cim_pb2.OfflineR(
            conversation="d:alice:bob",
            before=9,
            limit=50,
            request_id=2,
            acks=[cim_pb2.Cursor(conversation="g:team", seq=3)],
        ),
    ),
    (
        cim_pb2.HISTORY_R,
        cim_pb2.HistoryR(group="g:xyz", after=2, before=5, limit=20, request_id=3),
    ),
    (
        cim_pb2.GROUP_R,
        cim_pb2.GroupRequest(
            request_id=4, create=cim_pb2.CreateGroup(name="team", members=["bob", "carol"])
        ),
    ),
    (
        cim_pb2.MSG_R,
        cim_pb2.Message(
            group="0123456789abcdef",
            type=cim_pb2.IMAGE,
            client_seq=1_796_000_000_000_002,
            media=cim_pb2.Media(
                url="http://127.0.0.1:8082/files/f1",
                size=1795,
                mime="image/png",
                name="cat.png",
                width=64,
                height=48,
                file_id="f1",
            ),
        ),
    ),
]
NODE_FRAMES: list[tuple[int, ProtobufMessage]] = [
    (
        cim_pb2.MSG_A,
        cim_pb2.MsgA(
            client_seq=1_796_000_000_000_001,
            msg_id=387923101993668608,
            sent_at_ms=TIMESTAMP_MS + 5,
            conversation="d:alice:bob",
            seq=8,
        ),
    ),
    (
        cim_pb2.MSG_N,
        cim_pb2.Message(
            id=387923101993668609,
            to="alice",
            text="hi alice",
            client_seq=42,
            sent_at_ms=TIMESTAMP_MS + 9,
            device="phone",
            conversation="d:alice:bob",
            seq=9,
            prev_seq=41,
            **{"from": "bob"},
        ),
    ),
    (
        cim_pb2.ACK_N,
        cim_pb2.AckN(
            msg_id=387923101993668608,
            client_seq=1_796_000_000_000_001,
            status=cim_pb2.DELIVERED,
            to="bob",
        ),
    ),
    (
        cim_pb2.OFFLINE_SUMMARY_A,
        cim_pb2.OfflineSummaryA(
            request_id=1,
            total=2,
            conversations=[
                cim_pb2.ConversationSummary(
                    conversation="g:team",
                    group="team",
                    count=2,
                    last_seq=5,
                    cursor=3,
                    newest=cim_pb2.Message(id=5, text="newest", group="team", seq=5),
                )
            ],
            caught_up=[cim_pb2.Cursor(conversation="d:alice:bob", seq=9)],
        ),
    ),
    (
        cim_pb2.ERROR,
        cim_pb2.Error(
            code=cim_pb2.Error.RATE_LIMITED,
            message="slow down",
            request_type=cim_pb2.MSG_R,
            client_seq=1_796_000_000_000_002,
            retry_after_ms=250,
        ),
    ),
    (cim_pb2.KICKED, cim_pb2.Kicked(code=cim_pb2.Kicked.LOGGED_IN_ELSEWHERE, reason="elsewhere")),
]


def _fixed(*chunks: bytes) -> Callable[[int], bytes]:
    """A random source that returns the given chunks in order (fixed vectors)."""
    queue = list(chunks)

    def take(size: int) -> bytes:
        chunk = queue.pop(0)
        assert len(chunk) == size, (len(chunk), size)
        return chunk

    return take


def _json(message: ProtobufMessage) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=False)


def _type_name(frame_type: int) -> str:
    return cim_pb2.FrameType.Name(frame_type)


def _tcp(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _session(key: NodeKey, offered: list[str], suite: str, sealed: bytes | None) -> dict[str, Any]:
    """One whole session: the hello, the node's answer, then frames both ways."""
    fingerprint = key.fingerprint
    client = ClientHandshake(
        key.public_der,
        TOKEN,
        DEVICE,
        suite,
        offered,
        TIMESTAMP_MS,
        random_bytes=_fixed(CLIENT_NONCE, SECRET),
    )
    material = cim_pb2.KeyMaterial(
        secret=SECRET,
        token=TOKEN,
        timestamp_ms=TIMESTAMP_MS,
        device=DEVICE,
        hello_digest=hello_digest(2, offered, suite, CLIENT_NONCE, fingerprint),
    ).SerializeToString()
    hello = cim_pb2.ClientHello.FromString(client.hello_body()[1:])
    if sealed is not None and key.unseal(sealed) == material:
        hello.sealed_key = sealed  # keep the committed one: OAEP is randomised
    hello_body = bytes((cim_pb2.CLIENT_HELLO,)) + hello.SerializeToString()
    accepted = accept_client_hello(hello_body, key, offered, random_bytes=_fixed(SERVER_NONCE))
    login = cim_pb2.LoginResult(
        status=cim_pb2.LoginResult.OK,
        user="alice",
        device=DEVICE,
        heartbeat_interval_ms=30_000,
        heartbeat_timeout_ms=90_000,
        server_time_ms=TIMESTAMP_MS + 1,
    )
    reply = accepted.reply_body(bytes((cim_pb2.LOGIN_RESULT,)) + login.SerializeToString())
    # The client finishes on the node's answer: its ciphers then follow the node's.
    client_sealer, client_opener, first = client.finish(reply)
    assert first[1:] == login.SerializeToString()
    frames = []
    for frame_type, message in CLIENT_FRAMES:
        plaintext = bytes((frame_type,)) + message.SerializeToString()
        body = client_sealer.seal(plaintext)
        assert accepted.opener.open(body) == plaintext
        frames.append(_frame("client_to_node", frame_type, message, plaintext, body))
    for frame_type, message in NODE_FRAMES:
        plaintext = bytes((frame_type,)) + message.SerializeToString()
        body = accepted.sealer.seal(plaintext)
        assert client_opener.open(body) == plaintext
        frames.append(_frame("node_to_client", frame_type, message, plaintext, body))
    for n, frame in enumerate(frames):
        frame["n"] = sum(1 for f in frames[:n] if f["direction"] == frame["direction"]) + (
            1 if frame["direction"] == "node_to_client" else 0
        )
    return {
        "offered_suites": offered,
        "suite": suite,
        "hello_digest": hello_digest(2, offered, suite, CLIENT_NONCE, fingerprint).hex(),
        "key_material": material.hex(),
        "sealed_key": hello.sealed_key.hex(),
        "hello_body": hello_body.hex(),
        "hello_tcp": _tcp(hello_body).hex(),
        "login_result": _json(login),
        "login_result_plaintext": (
            bytes((cim_pb2.LOGIN_RESULT,)) + login.SerializeToString()
        ).hex(),
        "reply_body": reply.hex(),
        "reply_tcp": _tcp(reply).hex(),
        "frames": frames,
    }


def _frame(
    direction: str, frame_type: int, message: ProtobufMessage, plaintext: bytes, body: bytes
) -> dict[str, Any]:
    return {
        "direction": direction,
        "type": _type_name(frame_type),
        "type_number": frame_type,
        "message": message.DESCRIPTOR.name,
        "json": _json(message),
        "plaintext": plaintext.hex(),
        "body": body.hex(),
        "tcp": _tcp(body).hex(),
    }


def _refusal() -> dict[str, Any]:
    refusal = cim_pb2.HandshakeError(
        reason=cim_pb2.HandshakeError.SUITE_NOT_ALLOWED,
        message="suite not allowed",
        allowed_suites=[SUITE_RC4],
    )
    body = bytes((cim_pb2.HANDSHAKE_ERROR,)) + refusal.SerializeToString()
    return {"json": _json(refusal), "body": body.hex(), "tcp": _tcp(body).hex()}


def _resumption(key: NodeKey) -> dict[str, Any]:
    """The first session's LoginResult carried a ticket; the next hello resumes with it.

    The resumption secret comes from the first session (its secret and both nonces);
    the resume hello has its own client nonce and no sealed_key; the node's reply is
    sealed with keys derived from the resumption secret and both new nonces.
    """
    fingerprint = key.fingerprint
    secret = next_resumption_secret(SECRET, CLIENT_NONCE, SERVER_NONCE, fingerprint)
    tickets = Tickets(
        key.derived_key(TICKET_KEY_LABEL), "node1", RESUME_WINDOW_MS / 1000, _fixed(*TICKET_RANDOM)
    )
    ticket = tickets.seal(TIMESTAMP_MS / 1000, "00" * 32, "alice", DEVICE, secret)
    resume = Resumption(ticket, secret, fingerprint, DEVICE, TIMESTAMP_MS / 1000 + 600)
    client = ClientHandshake(
        key.public_der,
        "",
        DEVICE,
        SUITE_CHACHA,
        OFFERED,
        TIMESTAMP_MS,
        random_bytes=_fixed(RESUME_CLIENT_NONCE),
        resume=resume,
    )
    hello_body = client.hello_body()
    hello = cim_pb2.ClientHello.FromString(hello_body[1:])
    accepted = accept_client_hello(
        hello_body,
        key,
        OFFERED,
        random_bytes=_fixed(RESUME_SERVER_NONCE),
        tickets=tickets,
        now=TIMESTAMP_MS / 1000,
    )
    login = cim_pb2.LoginResult(
        status=cim_pb2.LoginResult.OK,
        user="alice",
        device=DEVICE,
        heartbeat_interval_ms=30_000,
        heartbeat_timeout_ms=90_000,
        server_time_ms=TIMESTAMP_MS + 2,
        resume_ticket=b"\x01" + bytes(range(0x20, 0x40)),
        resume_window_ms=RESUME_WINDOW_MS,
    )
    plaintext = bytes((cim_pb2.LOGIN_RESULT,)) + login.SerializeToString()
    reply = accepted.reply_body(plaintext)
    _, _, first = client.finish(reply)
    assert first == plaintext
    following = client.resumption_after(login, TIMESTAMP_MS / 1000)
    assert following is not None and following.secret == accepted.resumption_secret()
    return {
        "client_nonce": RESUME_CLIENT_NONCE.hex(),
        "server_nonce": RESUME_SERVER_NONCE.hex(),
        "resumption_secret": secret.hex(),
        "ticket": ticket.hex(),
        "resume_window_ms": RESUME_WINDOW_MS,
        "hello_digest": hello_digest(
            2, OFFERED, SUITE_CHACHA, RESUME_CLIENT_NONCE, fingerprint
        ).hex(),
        "resume_proof": hello.resume_proof.hex(),
        "hello_body": hello_body.hex(),
        "hello_tcp": _tcp(hello_body).hex(),
        "login_result": _json(login),
        "login_result_plaintext": plaintext.hex(),
        "reply_body": reply.hex(),
        "next_resumption_secret": following.secret.hex(),
    }


def build(previous: dict[str, Any] | None) -> dict[str, Any]:
    if previous is not None:
        pem = previous["node_key_pem"].encode()
        key = NodeKey._from_pem(pem, "tests/vectors/protocol.json")
    else:
        key = NodeKey.generate(2048)
        pem = key._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    sealed = {}
    for case in (previous or {}).get("sessions", []):
        sealed[case["suite"], tuple(case["offered_suites"])] = bytes.fromhex(case["sealed_key"])
    sessions = [
        _session(key, offered, suite, sealed.get((suite, tuple(offered))))
        for offered, suite in ((OFFERED, SUITE_CHACHA), ([SUITE_CHACHA, SUITE_RC4], SUITE_CHACHA))
    ]
    return {
        "about": "cim protocol test vectors; generated by python -m tests.vectors.protocol",
        "inputs": {
            "secret": SECRET.hex(),
            "client_nonce": CLIENT_NONCE.hex(),
            "server_nonce": SERVER_NONCE.hex(),
            "token": TOKEN,
            "device": DEVICE,
            "timestamp_ms": TIMESTAMP_MS,
            "protocol_version": 2,
        },
        "node_key_pem": pem.decode(),
        "server_key": key.public_der.hex(),
        "key_fingerprint": key.fingerprint.hex(),
        "heartbeat": {"body": "", "tcp": "00000000"},
        "handshake_error": _refusal(),
        "sessions": sessions,
        "resumption": _resumption(key),
    }


def _wrap(hex_text: str, width: int = 80) -> Iterator[str]:
    for start in range(0, len(hex_text), width):
        yield hex_text[start : start + width]


def markdown(vectors: dict[str, Any]) -> str:
    """The docs/protocol.md section: the first session, in the order a client meets it."""
    session = vectors["sessions"][0]
    inputs = vectors["inputs"]
    lines = [
        BEGIN,
        "",
        "### Test vectors: a whole session",
        "",
        "Generated from the Python implementation by `python -m tests.vectors.protocol`;",
        "`tests/vectors/protocol.json` has these and more (a second session offering both",
        "suites, a `HANDSHAKE_ERROR`, the node's RSA key, every message as protobuf JSON).",
        "The TypeScript SDK's tests (`clients/js`) check them byte for byte, and",
        "`tests/unit/test_protocol_vectors.py` checks they are current. Over TCP each body",
        "below is preceded by its `u32` length; over the WebSocket gateway one binary",
        "message carries one body as it is (an empty message is the heartbeat).",
        "",
        f"Inputs: `secret` = {inputs['secret'][:8]}..{inputs['secret'][-2:]}, "
        f"`client_nonce` = {inputs['client_nonce'][:4]}..{inputs['client_nonce'][-2:]}, "
        f"`server_nonce` = {inputs['server_nonce'][:4]}..{inputs['server_nonce'][-2:]}, "
        f"`token` = `{inputs['token']}`, `device` = `{inputs['device']}`, "
        f"`timestamp_ms` = {inputs['timestamp_ms']}, `offered_suites` = "
        f"{session['offered_suites']}, `suite` = `{session['suite']}`, the node key of "
        "the JSON file (fingerprint below). `sealed_key` is RSA-OAEP, which is randomised:",
        "a client's own differs, and decrypts to the same `KeyMaterial`.",
        "",
        "```",
        f"key_fingerprint  {vectors['key_fingerprint']}",
        f"hello_digest     {session['hello_digest']}",
    ]

    def block(label: str, hex_text: str) -> None:
        wrapped = list(_wrap(hex_text, 64))
        lines.append(f"{label:<16} {wrapped[0] if wrapped else '(empty)'}")
        lines.extend(f"{'':<16} {part}" for part in wrapped[1:])

    block("KeyMaterial", session["key_material"])
    hello = session["hello_body"]
    sealed = session["sealed_key"]
    cut = hello.index(sealed)
    block("CLIENT_HELLO", hello[:cut] + "<sealed_key, 256 bytes>")
    block("reply", session["reply_body"])
    block("LoginResult pt", session["login_result_plaintext"])
    lines.append("```")
    lines.append("")
    lines.append(
        "Then frames both ways (`n`: the direction's frame counter; plaintext = type byte"
        " || protobuf):"
    )
    lines.append("")
    lines.append("```")
    for frame in session["frames"]:
        arrow = "c->n" if frame["direction"] == "client_to_node" else "n->c"
        lines.append(f"{arrow} n={frame['n']} {frame['type']} {json.dumps(frame['json'])}")
        block("  plaintext", frame["plaintext"])
        block("  body", frame["body"])
    lines.append("```")
    lines.append("")
    refusal = vectors["handshake_error"]
    lines.append(
        f"A refusal (`HANDSHAKE_ERROR`, plaintext): {json.dumps(refusal['json'])} is the body "
        f"`{refusal['body']}`. A heartbeat is the empty body (`00000000` on TCP)."
    )
    lines.append("")
    resumed = vectors["resumption"]
    lines.append(
        "Resumption: the session above left this resumption secret; the node's ticket is"
        f" opaque to the client. The resume hello's `client_nonce` = "
        f"{resumed['client_nonce'][:4]}..{resumed['client_nonce'][-2:]}, the node's nonce = "
        f"{resumed['server_nonce'][:4]}..{resumed['server_nonce'][-2:]}:"
    )
    lines.append("")
    lines.append("```")
    block("resume secret", resumed["resumption_secret"])
    block("ticket", resumed["ticket"])
    block("hello_digest", resumed["hello_digest"])
    block("resume_proof", resumed["resume_proof"])
    block("CLIENT_HELLO", resumed["hello_body"])
    block("reply", resumed["reply_body"])
    block("LoginResult pt", resumed["login_result_plaintext"])
    block("next secret", resumed["next_resumption_secret"])
    lines.append("```")
    lines.append("")
    lines.append(END)
    return "\n".join(lines)


def _doc_with(section: str) -> str:
    with open(DOC_PATH, encoding="utf-8") as handle:
        doc = handle.read()
    if BEGIN in doc:
        head, rest = doc.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        return head + section + tail
    anchor = "# Frames after the handshake"
    head, tail = doc.split(anchor, 1)
    return head + section + "\n\n" + anchor + tail


def current() -> tuple[dict[str, Any] | None, str]:
    previous = None
    if os.path.exists(JSON_PATH):
        with open(JSON_PATH, encoding="utf-8") as handle:
            previous = json.load(handle)
    return previous, json.dumps(build(previous), indent=1, ensure_ascii=False) + "\n"


def stale() -> list[str]:
    """The files that differ from what the code produces now (empty: all current)."""
    _previous, fresh = current()
    problems = []
    with open(JSON_PATH, encoding="utf-8") as handle:
        if handle.read() != fresh:
            problems.append(JSON_PATH)
    with open(DOC_PATH, encoding="utf-8") as handle:
        if handle.read() != _doc_with(markdown(json.loads(fresh))):
            problems.append(DOC_PATH)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check, write nothing")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale()
        for path in problems:
            print(f"stale: {path} (run python -m tests.vectors.protocol)", file=sys.stderr)
        return 1 if problems else 0
    _previous, fresh = current()
    with open(JSON_PATH, "w", encoding="utf-8") as handle:
        handle.write(fresh)
    doc = _doc_with(markdown(json.loads(fresh)))
    with open(DOC_PATH, "w", encoding="utf-8") as handle:
        handle.write(doc)
    print(f"wrote {JSON_PATH} and the vectors section of {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

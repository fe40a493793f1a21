"""Local servers that speak the push providers' protocols, for integration tests.

``ProviderHttpServer`` (Twisted, plain HTTP on loopback) is FCM's OAuth token
endpoint, FCM's send endpoint and a webhook receiver at once; ``ApnsServer`` is
hypercorn speaking HTTP/2 over TLS with a certificate made for the test. Both keep
every request (headers, body, JWT claims they verified with the test's keys) and
answer from a script a test fills (200 when it is empty), so a test checks what was
sent, how often, and what the sender did with each answer.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.web import resource, server

from tests.integration.support.daemons import free_port

__all__ = [
    "Answer",
    "ApnsServer",
    "Captured",
    "ProviderHttpServer",
    "apns_key",
    "fcm_service_account",
    "verify_jwt",
]


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_jwt(token: str, public_key: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT signed RS256 or ES256 by ``public_key``; raises
    ValueError when the signature does not verify."""
    head, claims, signature = token.split(".")
    header = json.loads(_unb64(head))
    signed = f"{head}.{claims}".encode()
    raw = _unb64(signature)
    try:
        if header["alg"] == "RS256":
            public_key.verify(raw, signed, padding.PKCS1v15(), hashes.SHA256())
        elif header["alg"] == "ES256":
            der = encode_dss_signature(
                int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
            )
            public_key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
        else:
            raise ValueError(f"unexpected alg {header['alg']}")
    except InvalidSignature:
        raise ValueError("bad signature") from None
    return header, json.loads(_unb64(claims))


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class Captured:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    http_version: str = "1.1"
    claims: dict[str, Any] = field(default_factory=dict)
    """The verified JWT's claims (OAuth assertion or APNs provider token)."""
    jwt_header: dict[str, Any] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


def fcm_service_account(directory: str, token_uri: str) -> tuple[str, rsa.RSAPrivateKey]:
    """A service-account key file as Google issues them, with the test's own key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "cim-test",
        "private_key_id": "test-key-1",
        "private_key": pem,
        "client_email": "pusher@cim-test.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": token_uri,
    }
    path = os.path.join(directory, "fcm.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(info, handle)
    return path, key


def apns_key(directory: str) -> tuple[str, ec.EllipticCurvePrivateKey]:
    """An APNs .p8 key file (PKCS#8 PEM, P-256)."""
    key = ec.generate_private_key(ec.SECP256R1())
    path = os.path.join(directory, "AuthKey_TESTKEY123.p8")
    with open(path, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path, key


class _Recorder(resource.Resource):
    isLeaf = True

    def __init__(self, owner: ProviderHttpServer) -> None:
        super().__init__()
        self.owner = owner

    def render_POST(self, request: server.Request) -> bytes:
        return self.owner.answer(request)


class ProviderHttpServer:
    """FCM's token and send endpoints and a webhook receiver, on one loopback port."""

    def __init__(self, oauth_key: rsa.RSAPublicKey | None = None) -> None:
        self.port_number = free_port()
        self.oauth_key = oauth_key
        self.tokens: list[Captured] = []
        self.sends: list[Captured] = []
        self.webhooks: list[Captured] = []
        self.script: list[Answer] = []
        self.issued: list[str] = []
        self._port: IListeningPort | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port_number}"

    def start(self) -> None:
        self._port = reactor.listenTCP(  # type: ignore[attr-defined]
            self.port_number, server.Site(_Recorder(self)), interface="127.0.0.1"
        )

    def stop(self) -> Any:
        return self._port.stopListening() if self._port is not None else None

    def answer(self, request: server.Request) -> bytes:
        path = request.path.decode()
        headers = {
            name.decode().lower(): values[0].decode()
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        body = request.content.read() if request.content is not None else b""
        captured = Captured(path, headers, body, time.time())
        if path == "/token":
            return self._token(request, captured)
        (self.sends if path.startswith("/v1/projects/") else self.webhooks).append(captured)
        reply = self.script.pop(0) if self.script else Answer(200, {}, b"{}")
        request.setResponseCode(reply.status)
        for name, value in reply.headers.items():
            request.setHeader(name, value)
        return reply.body

    def _token(self, request: server.Request, captured: Captured) -> bytes:
        form = urllib.parse.parse_qs(captured.body.decode())
        try:
            assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
            captured.jwt_header, captured.claims = verify_jwt(form["assertion"][0], self.oauth_key)
        except (AssertionError, KeyError, ValueError) as exc:
            request.setResponseCode(400)
            return json.dumps({"error": "invalid_grant", "error_description": str(exc)}).encode()
        self.tokens.append(captured)
        token = f"ya29.test-{len(self.tokens)}"
        self.issued.append(token)
        request.setHeader("Content-Type", "application/json")
        return json.dumps(
            {"access_token": token, "expires_in": 3600, "token_type": "Bearer"}
        ).encode()


def self_signed_certificate(directory: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and localhost, and its key; the certificate is its
    own CA (the client trusts exactly it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "apns-cert.pem")
    key_path = os.path.join(directory, "apns-key.pem")
    with open(cert_path, "wb") as handle:
        handle.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


class ApnsServer:
    """Apple's push API as a test sees it: HTTP/2 over TLS (hypercorn, its own thread
    and event loop), checking each provider token with the test's public key."""

    def __init__(self, directory: str, public_key: ec.EllipticCurvePublicKey) -> None:
        self.port_number = free_port()
        self.cert, self.key = self_signed_certificate(directory)
        self.public_key = public_key
        self.requests: list[Captured] = []
        self.script: list[Answer] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port_number}"

    def start(self) -> None:
        self._started.clear()
        self._thread = threading.Thread(target=self._run, name="apns-test-server", daemon=True)
        self._thread.start()
        if not self._started.wait(15):
            raise AssertionError("the APNs test server did not start")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(15)
        self._thread = None

    def _run(self) -> None:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"127.0.0.1:{self.port_number}"]
        config.certfile = self.cert
        config.keyfile = self.key
        config.alpn_protocols = ["h2"]
        config.accesslog = None
        config.errorlog = None

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            # Connections still open when the server stops end cancelled: not news.
            self._loop.set_exception_handler(lambda loop, context: None)
            self._stop = asyncio.Event()
            self._loop.call_soon(self._started.set)
            await serve(self._app, config, shutdown_trigger=self._stop.wait)  # type: ignore[arg-type]

        asyncio.run(main())

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {name.decode().lower(): value.decode() for name, value in scope["headers"]}
        captured = Captured(scope["path"], headers, body, time.time(), scope["http_version"])
        reply = Answer(200)
        try:
            token = headers.get("authorization", "").removeprefix("bearer ")
            captured.jwt_header, captured.claims = verify_jwt(token, self.public_key)
        except ValueError:
            reply = Answer(403, {}, b'{"reason":"InvalidProviderToken"}')
        with self._lock:
            self.requests.append(captured)
            if reply.status == 200 and self.script:
                reply = self.script.pop(0)
        response_headers = [(b"apns-id", b"00000000-0000-0000-0000-000000000001")]
        response_headers += [(k.encode(), v.encode()) for k, v in reply.headers.items()]
        await send(
            {"type": "http.response.start", "status": reply.status, "headers": response_headers}
        )
        await send({"type": "http.response.body", "body": reply.body})

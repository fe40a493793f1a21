"""Talking to the router over HTTP: login (which IM node, which key) and logout."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool

from cim.client.errors import ServiceError
from cim.json_convention import epoch_seconds
from cim.reactor import ICimReactor


class RouterError(ServiceError):
    """The router refused or could not be reached; ``code`` is its error code."""


@dataclass(frozen=True)
class NodeTarget:
    node_id: str
    host: str
    port: int
    ws_url: str = ""
    """The node's WebSocket gateway (docs/protocol.md), when it has one."""


@dataclass(frozen=True)
class LoginTicket:
    """What a successful login hands the client; the token is a secret (no repr)."""

    token: str
    session_id: str
    user: str
    node: NodeTarget
    server_key: bytes
    key_fingerprint: bytes
    heartbeat_interval: float
    heartbeat_timeout: float
    cipher_suites: tuple[str, ...]
    expires_at: float

    def __repr__(self) -> str:
        return f"LoginTicket(user={self.user!r}, node={self.node!r}, session={self.session_id!r})"


def parse_ticket(body: dict[str, Any]) -> LoginTicket:
    """Check a login response, including that the key matches its fingerprint."""
    try:
        server_key = base64.b64decode(body["server_key"])
        fingerprint = bytes.fromhex(body["key_fingerprint"])
        node = body["node"]
        ticket = LoginTicket(
            token=str(body["token"]),
            session_id=str(body.get("session_id", "")),
            user=str(body["user"]),
            node=NodeTarget(
                str(node.get("id", "")),
                str(node["host"]),
                int(node["port"]),
                str(node.get("ws_url", "")),
            ),
            server_key=server_key,
            key_fingerprint=fingerprint,
            heartbeat_interval=float(body["heartbeat_interval"]),
            heartbeat_timeout=float(body["heartbeat_timeout"]),
            cipher_suites=tuple(body.get("cipher_suites", ())),
            expires_at=epoch_seconds(str(body["expires_at"])) if "expires_at" in body else 0.0,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RouterError(
            0, "bad_response", f"the router's login answer is malformed: {exc}"
        ) from None
    if not hmac.compare_digest(hashlib.sha256(server_key).digest(), fingerprint):
        raise RouterError(0, "bad_key", "the node key does not match its fingerprint")
    return ticket


class RouterClient:
    """Talks to the first router that answers, then sticks to it until it stops answering.

    Several base URLs let a client survive a router that is down (design: 本地缓存
    服务器IP), the way a DNS name with several addresses would.
    """

    def __init__(self, reactor: ICimReactor, base_urls: str | Sequence[str]) -> None:
        # One short-lived connection per call: logins are rare, and a persistent pool
        # would keep idle sockets and timers alive for nothing.
        pool = HTTPConnectionPool(reactor, persistent=False)
        self._http = HTTPClient(Agent(reactor, pool=pool))
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("at least one router URL is needed")
        self._bases = [url.rstrip("/") for url in urls]
        self._current = 0

    @property
    def _base(self) -> str:
        return self._bases[self._current]

    async def login(self, user: str, password: str, device: str) -> LoginTicket:
        body = await self._post(
            "/api/v1/login", {"user": user, "password": password, "device": device}
        )
        return parse_ticket(body)

    async def logout(self, token: str) -> None:
        await self._post("/api/v1/logout", {}, headers={"Authorization": f"Bearer {token}"})

    async def _post(
        self, path: str, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """POST to the current router, moving on to the next ones while unreachable."""
        for _ in range(len(self._bases)):
            try:
                return await self._post_once(path, payload, headers)
            except RouterError as error:
                if error.code != "unreachable" or len(self._bases) == 1:
                    raise
                self._current = (self._current + 1) % len(self._bases)
        raise RouterError(0, "unreachable", f"no router answered ({', '.join(self._bases)})")

    async def _post_once(
        self, path: str, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        all_headers: dict[bytes | str, bytes | str] = {"Content-Type": "application/json"}
        all_headers.update(headers or {})
        try:
            response = await self._http.post(
                self._base + path, data=json.dumps(payload).encode(), headers=all_headers
            )
            raw = await treq.content(response)
        except Exception as exc:  # connection refused, DNS, reset: all mean unreachable
            raise RouterError(
                0, "unreachable", f"cannot reach the router at {self._base}: {exc}"
            ) from None
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        if response.code != 200:
            raise RouterError(
                response.code,
                str(body.get("error", "http_error")),
                str(body.get("message", f"HTTP {response.code}")),
            )
        if not isinstance(body, dict):
            raise RouterError(response.code, "bad_response", "the router answered with no object")
        return body

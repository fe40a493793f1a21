"""Talking to the logic service: accounts, bindings, SOS, fences, positions, posts.

A thin layer over the HTTP JSON API (docs/logic.md): one method per call, answers
returned as the decoded JSON, and every refusal raised as ``LogicError`` with the
service's error code, so a script can tell ``not_found`` from ``own_post``. The
bearer token comes from a router login (``cim.client.router``) and is never shown.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool

from cim.client.errors import ServiceError
from cim.json_convention import iso_time
from cim.reactor import ICimReactor

__all__ = [
    "API_ROOT",
    "AccountCalls",
    "LogicApi",
    "LogicClient",
    "LogicError",
    "PostCalls",
    "SafetyCalls",
]

API_ROOT = "/api/v1"


class LogicError(ServiceError):
    """The service refused (``status`` 4xx/5xx) or could not be reached (``status`` 0)."""


def _segment(name: str) -> str:
    """A name as one path segment: a '/' or '?' in it cannot reach another endpoint."""
    return urllib.parse.quote(name, safe="")


def _without_none(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def _wire_time(value: float | str | None) -> str | None:
    """A time as the service takes it (ISO 8601); epoch seconds are converted."""
    return iso_time(value) if isinstance(value, int | float) else value


def _wire_position(position: Mapping[str, Any]) -> dict[str, Any]:
    return _without_none({**position, "at": _wire_time(position.get("at"))})


class LogicApi:
    """One user's connection to the logic service: the token, the pool, one call.

    The calls themselves are grouped by concern in the classes below it, each usable
    alone (``PostCalls(reactor, url, token).create_post(...)``); ``LogicClient`` has
    them all, for ``cim-client``. ``token`` None: only ``register`` can be called.
    """

    def __init__(
        self,
        reactor: ICimReactor,
        base_url: str,
        token: str | None = None,
        http: HTTPClient | None = None,
    ) -> None:
        """``base_url`` is the service's root, e.g. ``http://127.0.0.1:8081``; ``http``
        replaces treq in tests (``treq.testing.StubTreq``)."""
        base = base_url.rstrip("/")
        if base.endswith(API_ROOT):
            base = base[: -len(API_ROOT)]
        self.base_url = base
        self._token = token
        self._pool: HTTPConnectionPool | None = None
        if http is None:
            self._pool = HTTPConnectionPool(reactor, persistent=False)
            http = HTTPClient(Agent(reactor, pool=self._pool))
        self._http = http

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    async def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, Any] | None = None,
    ) -> Any:
        """One call below /api/v1; the decoded answer, or LogicError for any refusal."""
        url = self.base_url + API_ROOT + path
        if query:
            url += "?" + urllib.parse.urlencode(_without_none(query))
        headers: dict[bytes | str, bytes | str] = {"Accept": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            response = await self._http.request(method, url, headers=headers, data=data)
            raw = await treq.content(response)
        except Exception as exc:  # refused, reset, DNS: all mean "not reachable now"
            raise LogicError(
                0, "unreachable", f"cannot reach the logic service at {self.base_url}: {exc}"
            ) from None
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = None
        status = int(response.code)
        if not 200 <= status < 300:
            details = answer if isinstance(answer, dict) else {}
            raise LogicError(
                status,
                str(details.get("error", "http_error")),
                str(details.get("message", f"HTTP {status}")),
            )
        if answer is None and raw:
            raise LogicError(status, "bad_response", "the logic service did not answer JSON")
        return answer


class AccountCalls(LogicApi):
    """The account and its bindings: who a device's guardians are."""

    async def register(
        self, name: str, password: str, kind: str = "person", display_name: str | None = None
    ) -> dict[str, Any]:
        body = _without_none(
            {"name": name, "password": password, "kind": kind, "display_name": display_name}
        )
        return dict(await self.call("POST", "/register", body))

    async def me(self) -> dict[str, Any]:
        return dict(await self.call("GET", "/me"))

    async def binding_code(self) -> dict[str, Any]:
        """A device asks for a code to show its guardian."""
        return dict(await self.call("POST", "/devices/me/binding-code"))

    async def bind(self, device: str, code: str) -> dict[str, Any]:
        return dict(await self.call("POST", "/bindings", {"device": device, "code": code}))

    async def bindings(self) -> dict[str, Any]:
        """``{"items": [binding, ...]}``."""
        return dict(await self.call("GET", "/bindings"))

    async def approve_binding(self, device: str, guardian: str) -> dict[str, Any]:
        path = f"/bindings/{_segment(device)}/{_segment(guardian)}/approve"
        return dict(await self.call("POST", path))

    async def unbind(self, device: str, guardian: str) -> dict[str, Any]:
        return dict(await self.call("DELETE", f"/bindings/{_segment(device)}/{_segment(guardian)}"))


class SafetyCalls(LogicApi):
    """A device's safety: SOS alarms, geofences and the positions checked against them."""

    async def raise_sos(
        self,
        lat: float,
        lon: float,
        accuracy_m: float | None = None,
        battery: int | None = None,
    ) -> dict[str, Any]:
        body = _without_none({"lat": lat, "lon": lon, "accuracy_m": accuracy_m, "battery": battery})
        return dict(await self.call("POST", "/sos", body))

    async def sos_events(
        self, device: str | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        """``{"items": [event, ...]}``, newest first."""
        return dict(await self.call("GET", "/sos", query={"device": device, "limit": limit}))

    async def sos_event(self, event: int) -> dict[str, Any]:
        return dict(await self.call("GET", f"/sos/{int(event)}"))

    async def acknowledge_sos(self, event: int) -> dict[str, Any]:
        return dict(await self.call("POST", f"/sos/{int(event)}/ack"))

    async def add_circle_fence(
        self, device: str, name: str, lat: float, lon: float, radius_m: float
    ) -> dict[str, Any]:
        body = {"name": name, "circle": {"lat": lat, "lon": lon, "radius_m": radius_m}}
        return dict(await self.call("POST", f"/devices/{_segment(device)}/fences", body))

    async def add_polygon_fence(
        self, device: str, name: str, points: Sequence[tuple[float, float]]
    ) -> dict[str, Any]:
        body = {"name": name, "polygon": [[lat, lon] for lat, lon in points]}
        return dict(await self.call("POST", f"/devices/{_segment(device)}/fences", body))

    async def fences(self, device: str) -> dict[str, Any]:
        """``{"items": [fence, ...]}``."""
        return dict(await self.call("GET", f"/devices/{_segment(device)}/fences"))

    async def delete_fence(self, device: str, fence: int) -> dict[str, Any]:
        path = f"/devices/{_segment(device)}/fences/{int(fence)}"
        return dict(await self.call("DELETE", path))

    async def report_positions(self, positions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """A device reports fixes: each ``{lat, lon, accuracy_m?, at?}``, ``at`` in epoch
        seconds or already an ISO 8601 string."""
        body = {"positions": [_wire_position(position) for position in positions]}
        return dict(await self.call("POST", "/locations", body))

    async def positions(
        self,
        device: str,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """``{"items": [position, ...]}``, newest first; ``since``/``until`` epoch seconds."""
        query = {"since": _wire_time(since), "until": _wire_time(until), "limit": limit}
        return dict(await self.call("GET", f"/devices/{_segment(device)}/locations", query=query))


class PostCalls(LogicApi):
    """Posts and their likes."""

    async def create_post(
        self,
        text: str,
        media_url: str | None = None,
        like_goal: int | None = None,
        audience: str | None = None,
    ) -> dict[str, Any]:
        body = _without_none(
            {"text": text, "media_url": media_url, "like_goal": like_goal, "audience": audience}
        )
        return dict(await self.call("POST", "/posts", body))

    async def posts(
        self, author: str | None = None, before: int | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        """``{"items": [post, ...]}``, newest first."""
        query = {"author": author, "before": before, "limit": limit}
        return dict(await self.call("GET", "/posts", query=query))

    async def post(self, post: int) -> dict[str, Any]:
        return dict(await self.call("GET", f"/posts/{int(post)}"))

    async def delete_post(self, post: int) -> dict[str, Any]:
        return dict(await self.call("DELETE", f"/posts/{int(post)}"))

    async def like(self, post: int) -> dict[str, Any]:
        return dict(await self.call("PUT", f"/posts/{int(post)}/like"))

    async def unlike(self, post: int) -> dict[str, Any]:
        return dict(await self.call("DELETE", f"/posts/{int(post)}/like"))

    async def likers(
        self, post: int, limit: int | None = None, offset: int | None = None
    ) -> dict[str, Any]:
        """``{"items": [name, ...], "likes": total}``."""
        answer = await self.call(
            "GET", f"/posts/{int(post)}/likes", query={"limit": limit, "offset": offset}
        )
        return dict(answer)


class PushCalls(LogicApi):
    """This device's push registration (docs/push.md): the session's device, always."""

    async def register_push(
        self, provider: str, token: str, app: str | None = None, locale: str | None = None
    ) -> dict[str, Any]:
        body = _without_none({"provider": provider, "token": token, "app": app, "locale": locale})
        return dict(await self.call("PUT", "/devices/me/push", body))

    async def push_registration(self) -> dict[str, Any]:
        return dict(await self.call("GET", "/devices/me/push"))

    async def remove_push(self) -> dict[str, Any]:
        return dict(await self.call("DELETE", "/devices/me/push"))


class LogicClient(AccountCalls, SafetyCalls, PostCalls, PushCalls):
    """Every call of the logic service on one connection: what ``cim-client`` runs."""

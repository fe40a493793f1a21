"""One user's HTTP connection to the file service: the token, the pool, the errors.

Every call carries the router's token, which is a secret: it goes only into the
Authorization header, never into a repr, a log line or the upload state file. An
answer outside the expected statuses becomes a ``FileServiceError`` with the
service's error code; a service that cannot be reached is status 0, ``unreachable``.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool

from cim.client.file_values import FileServiceError
from cim.reactor import ICimReactor

__all__ = ["FileHttp"]


class FileHttp:
    """JSON calls and streamed downloads on one connection pool."""

    def __init__(
        self,
        reactor: ICimReactor,
        base_url: str,
        token: str | None,
        parallel: int,
        http: HTTPClient | None = None,
    ) -> None:
        """``parallel`` connections are kept open (an upload sends that many chunks at
        once); ``http`` replaces treq in tests (``treq.testing.StubTreq``)."""
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._pool: HTTPConnectionPool | None = None
        if http is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = parallel
            http = HTTPClient(Agent(reactor, pool=self._pool))
        self._http = http

    def __repr__(self) -> str:
        return f"FileHttp({self.base_url!r})"

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    def _headers(
        self, extra: dict[bytes | str, bytes | str] | None = None
    ) -> dict[bytes | str, bytes | str]:
        headers: dict[bytes | str, bytes | str] = {}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        headers.update(extra or {})
        return headers

    async def call(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200, 201),
    ) -> dict[str, Any]:
        """One call below the service's root; its JSON answer (an object, maybe empty)."""
        extra: dict[bytes | str, bytes | str] = {}
        extra.update(headers or {})
        body = data
        if payload is not None:
            body = json.dumps(payload).encode()
            extra["Content-Type"] = "application/json"
        try:
            response = await self._http.request(
                method, self.base_url + path, headers=self._headers(extra), data=body
            )
            raw = await treq.content(response)
        except Exception as exc:  # refused, reset, DNS: all mean "not reachable now"
            raise FileServiceError(
                0, "unreachable", f"cannot reach the file service at {self.base_url}: {exc}"
            ) from None
        try:
            parsed = json.loads(raw) if raw else {}
        except ValueError:
            parsed = {}
        if not isinstance(parsed, dict):
            parsed = {}
        if response.code not in ok:
            extra_fields = {k: v for k, v in parsed.items() if k not in ("error", "message")}
            raise FileServiceError(
                response.code,
                str(parsed.get("error", "http_error")),
                str(parsed.get("message", f"HTTP {response.code}")),
                extra_fields,
            )
        return parsed

    async def get(self, url: str, offset: int) -> Any:
        """A download's response, its body not read yet; from ``offset`` with Range."""
        headers: dict[bytes | str, bytes | str] = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = await self._http.get(url, headers=self._headers(headers), unbuffered=True)
        except Exception as exc:
            where = url.split("?")[0]
            raise FileServiceError(0, "unreachable", f"cannot reach {where}: {exc}") from None
        if response.code not in (200, 206):
            raw = await treq.content(response)
            try:
                body = json.loads(raw)
            except ValueError:
                body = {}
            body = body if isinstance(body, dict) else {}
            raise FileServiceError(
                response.code,
                str(body.get("error", "http_error")),
                str(body.get("message", f"HTTP {response.code}")),
            )
        return response

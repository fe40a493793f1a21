"""The logic service in the daemon: its features, its HTTP port and its housekeeping."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cim.logic.accounts import AccountApi
from cim.logic.api import Endpoint, LogicResource, logic_site
from cim.logic.bindings import BindingApi
from cim.logic.context import LogicContext
from cim.logic.fences import FenceApi
from cim.logic.posts import PostApi
from cim.logic.sos import SosApi

__all__ = ["LogicListener", "logic_endpoints"]


class Feature(Protocol):
    def endpoints(self) -> list[Endpoint]: ...


class Housekeeping(Protocol):
    """A feature with periodic work (the location retention purge)."""

    async def housekeeping(self) -> None: ...


def logic_features(ctx: LogicContext) -> list[Any]:
    """Every feature of the service, in the order the OpenAPI document lists them."""
    return [AccountApi(ctx), BindingApi(ctx), SosApi(ctx), FenceApi(ctx), PostApi(ctx)]


def logic_endpoints(features: Sequence[Feature]) -> list[Endpoint]:
    return [endpoint for feature in features for endpoint in feature.endpoints()]


class LogicListener:
    _log = Logger()

    def __init__(self, ctx: LogicContext) -> None:
        self.ctx = ctx
        self.features = logic_features(ctx)
        self.resource = LogicResource(
            logic_endpoints(self.features),
            ctx.state,
            ctx.accounts.get_user,
            ctx.config.max_body_size,
        )
        self.port: IListeningPort | None = None
        self._housekeeping = LoopingCall(self._tidy)
        self._housekeeping.clock = ctx.clock

    async def start(self) -> None:
        site = logic_site(self.resource, self.ctx.config.max_body_size, self.ctx.clock)
        self.port = await serverFromString(self.ctx.clock, self.ctx.config.listen).listen(site)
        self._housekeeping.start(self.ctx.config.purge_interval, now=True)
        self._log.info("logic listening on {listen}", listen=self.ctx.config.listen)

    async def _tidy(self) -> None:
        for feature in self.features:
            tidy = getattr(feature, "housekeeping", None)
            if tidy is None:
                continue
            try:
                await tidy()
            except Exception:
                self._log.failure("logic housekeeping failed; trying again later")

    async def stop(self) -> None:
        if self._housekeeping.running:
            self._housekeeping.stop()
        if self.port is not None:
            await maybeDeferred(self.port.stopListening)
            self.port = None

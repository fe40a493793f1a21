"""The logic service in the daemon: its features, its HTTP port and its housekeeping."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import server

from cim.http.limits import unguarded
from cim.http.telemetry import UNOBSERVED, SiteTelemetry
from cim.logic.context import LogicContext
from cim.logic.features import LogicFeatures
from cim.logic.http.api import logic_resource, logic_site
from cim.logic.http.operations import logic_endpoints

__all__ = ["LogicListener"]


class LogicListener:
    _log = Logger()

    def __init__(
        self,
        ctx: LogicContext,
        telemetry: SiteTelemetry = UNOBSERVED,
        guard: Callable[[server.Site], IProtocolFactory] = unguarded,
    ) -> None:
        self.ctx = ctx
        self.telemetry = telemetry
        self.guard = guard
        self.features = LogicFeatures.build(ctx)
        self.resource = logic_resource(
            logic_endpoints(self.features),
            ctx.sessions,
            ctx.accounts.get_user,
            ctx.config.max_body_size,
            ctx.limits,
        )
        self.port: IListeningPort | None = None
        self._housekeeping = LoopingCall(self._tidy)
        self._housekeeping.clock = ctx.clock

    async def start(self) -> None:
        config = self.ctx.config
        site = logic_site(self.resource, config.max_body_size, self.ctx.clock, self.telemetry)
        self.port = await serverFromString(self.ctx.clock, self.ctx.config.listen).listen(
            self.guard(site)
        )
        self._housekeeping.start(self.ctx.config.purge_interval, now=True)
        self._log.info("logic listening on {listen}", listen=self.ctx.config.listen)

    async def _tidy(self) -> None:
        for feature in self.features.housekeeping():
            try:
                await feature.housekeeping()
            except Exception:
                self._log.failure("logic housekeeping failed; trying again later")

    async def stop(self) -> None:
        if self._housekeeping.running:
            self._housekeeping.stop()
        if self.port is not None:
            await maybeDeferred(self.port.stopListening)
            self.port = None

"""The logic service in the daemon: its port, then its housekeeping.

Two children (``cim.services.tree``), started in this order and stopped in reverse:
the logic ``Listener`` (the port, opened once every room before it in the daemon's
tree, the database and the accounts' KDF pool among them, is ready), then
``LogicHousekeeping`` (every feature's tidying, every ``[logic] purge_interval``), which
stops first, so no tidying runs while the port closes. The features hold no pool of
their own: nothing drains after the port.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import server

from cim.http.limits import unguarded
from cim.http.telemetry import UNOBSERVED, SiteTelemetry
from cim.logic.context import LogicContext
from cim.logic.features import LogicFeatures
from cim.logic.http.api import LogicEndpoint, logic_resource, logic_site
from cim.logic.http.operations import logic_endpoints
from cim.reactor import ICimReactor
from cim.services.tree import AsyncService, Listener, OrderedServices

__all__ = ["LogicHousekeeping", "LogicService"]


class LogicService(OrderedServices):
    """The logic features behind their HTTP port, and their housekeeping."""

    def __init__(
        self,
        ctx: LogicContext,
        reactor: ICimReactor,
        telemetry: SiteTelemetry = UNOBSERVED,
        guard: Callable[[server.Site], IProtocolFactory] = unguarded,
        more_endpoints: Sequence[LogicEndpoint] = (),
    ) -> None:
        """``more_endpoints``: operations of rooms outside cim.logic served on the same
        port under the same rules (the push registrations, cim.push.http)."""
        super().__init__("logic")
        self.ctx = ctx
        self.features = LogicFeatures.build(ctx)
        config = ctx.config
        self.resource = logic_resource(
            [*logic_endpoints(self.features), *more_endpoints],
            ctx.sessions,
            ctx.accounts.get_user,
            config.max_body_size,
            ctx.limits,
        )
        site = logic_site(
            self.resource, config.max_body_size, ctx.clock, telemetry, config.cors_origins
        )
        self.listener = self.add(Listener("logic", config.listen, reactor, guard(site)))
        self.add(LogicHousekeeping(self.features, config.purge_interval, ctx.clock))


class LogicHousekeeping(AsyncService):
    """Every feature's tidying (expired codes, old positions...) on the node's clock."""

    _log = Logger()

    def __init__(self, features: LogicFeatures, interval: float, clock: IReactorTime) -> None:
        super().__init__("logic housekeeping")
        self.features = features
        self.interval = interval
        self._housekeeping = LoopingCall(self._tidy)
        self._housekeeping.clock = clock

    def start(self) -> None:
        self._housekeeping.start(self.interval, now=True)

    async def _tidy(self) -> None:
        for feature in self.features.housekeeping():
            try:
                await feature.housekeeping()
            except Exception:
                self._log.failure("logic housekeeping failed; trying again later")

    def stop(self) -> None:
        if self._housekeeping.running:
            self._housekeeping.stop()

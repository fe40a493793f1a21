"""Push in the daemon: everything cim.push is made of, from ``[push]``, with a lifetime.

``PushService`` always serves the registrations (the logic service's endpoints and
PUSH_R answer ``push_disabled`` while ``[push] enabled`` is off). When enabled, it
reads the providers' keys at start (a bad key stops the node with one line naming
the key), starts the push thread pool, and ``watch`` wraps the node's timelines so
every new entry reaches the decisions. Stopping cancels the collapse windows, drops
the queue (docs/push.md: those pushes are lost), lets requests in flight finish and
closes the providers' connections.
"""

from __future__ import annotations

import os
import random
import ssl
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from cim.backends.backoff import Backoff
from cim.backends.threads import BELOW_THE_REACTOR, ThreadPoolRunner
from cim.config import PushConfig
from cim.im.collaborators import Stores, in_background
from cim.interfaces import IRouteStore
from cim.metrics import PushMetrics
from cim.oplog import OperationLog
from cim.push.decisions import DecidingTimeline, DecisionSettings, PushDecisions
from cim.push.notification import FAILED, Notification, Outcome, PushProvider
from cim.push.presence import DevicePresence, DevicesHere
from cim.push.queue import PushQueue, QueueSettings
from cim.push.registrations import Registrations
from cim.reactor import ICimReactor
from cim.services.tree import AsyncService, StartupError
from cim.storage.database import Database
from cim.storage.sos import sos_event_txn

__all__ = ["Providers", "PushService"]


class Providers:
    """Sends each notification through its registration's provider."""

    def __init__(self, providers: dict[str, PushProvider]) -> None:
        self.by_name = providers

    def send(self, notification: Notification) -> Deferred[Outcome]:
        provider = self.by_name.get(notification.registration.provider)
        if provider is None:
            return succeed(Outcome(FAILED, 0, "provider not configured on this node"))
        return provider.send(notification)

    def close(self) -> Deferred[Any]:
        return gatherResults([p.close() for p in self.by_name.values()], consumeErrors=True)


def _read_secret(path: str) -> bytes:
    with open(path, "rb") as handle:
        secret = handle.read().strip()
    if len(secret) < 16:
        raise ValueError("the secret is shorter than 16 bytes")
    return secret


class PushService(AsyncService):
    log = Logger()

    def __init__(
        self,
        config: PushConfig,
        reactor: ICimReactor,
        database: Database,
        metrics: PushMetrics,
        oplog: OperationLog | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__("push")
        self.config = config
        self.reactor = reactor
        self.metrics = metrics
        self.registrations = Registrations(
            database, reactor, config.enabled, config.providers, oplog
        )
        self.runner = ThreadPoolRunner("cim-push", config.threads, reactor, nice=BELOW_THE_REACTOR)
        self.providers = Providers({})
        self.queue = PushQueue(
            reactor,
            self.providers.send,
            self._token_dead,
            QueueSettings(
                config.queue_size,
                config.concurrency,
                Backoff(config.retry_initial, config.retry_max, jitter=0.5),
                config.max_attempts,
            ),
            metrics,
            rng,
            alarm_open=self._alarm_open,
        )
        self._database = database
        self.decisions: PushDecisions | None = None

    def watch(
        self,
        stores: Stores,
        node_id: str,
        devices_here: DevicesHere,
        routes: IRouteStore,
        members: Callable[[str], Deferred[list[str]]],
    ) -> None:
        """Hand every new entry of the node's timelines to the decisions (when enabled)."""
        if not self.config.enabled:
            return
        timeline = stores.timeline
        config = self.config
        self.decisions = PushDecisions(
            self.reactor,
            self.registrations.of_users,
            DevicePresence(node_id, devices_here, routes),
            members,
            timeline.summary,
            self.queue.put,
            DecisionSettings(
                config.collapse_window,
                config.group_rate,
                config.show_text,
                config.ttl,
                config.background_grace,
                config.background_pending,
            ),
            self.registrations.known_unregistered,
        )
        stores.timeline = DecidingTimeline(timeline, self.decisions)
        self.metrics.queue_depth = lambda: self.queue.depth

    async def _alarm_open_now(self, alarm: int) -> bool:
        event = await self._database.run(sos_event_txn, alarm)
        return event is not None and event.handled_by is None

    def _alarm_open(self, alarm: int) -> Deferred[bool]:
        """Whether an SOS alarm still waits for a guardian (its pushes retry until then)."""
        return Deferred.fromCoroutine(self._alarm_open_now(alarm))

    def _token_dead(self, notification: Notification, outcome: Outcome) -> None:
        in_background(
            Deferred.fromCoroutine(
                self.registrations.token_dead(notification.registration, outcome.reason)
            ),
            self.log,
            "remove a dead push token",
        )

    # --- lifetime ---------------------------------------------------------------------

    def start(self) -> None:
        if not self.config.enabled:
            return
        self.providers.by_name.update(self._build_providers())
        self.runner.start()

    def _build_providers(self) -> dict[str, PushProvider]:
        config = self.config
        built: dict[str, PushProvider] = {}
        run = self.runner.run
        if config.fcm_key_file:
            from cim.push.providers.fcm import FcmProvider, load_service_account

            try:
                credentials = load_service_account(config.fcm_key_file)
            except (OSError, ValueError, KeyError) as exc:
                raise StartupError(
                    f"[push] fcm_key_file = {config.fcm_key_file!r}: {exc}"
                ) from None
            project = config.fcm_project or str(credentials.project_id or "")
            if not project:
                raise StartupError("[push] fcm_project: the key file names no project_id; set it")
            built["fcm"] = FcmProvider(
                self.reactor, run, credentials, project, config.fcm_endpoint, config.timeout
            )
        if config.apns_key_file:
            from cim.push.providers.apns import ApnsProvider, load_p8_key

            try:
                key = load_p8_key(config.apns_key_file)
            except (OSError, ValueError) as exc:
                raise StartupError(
                    f"[push] apns_key_file = {config.apns_key_file!r}: {exc}"
                ) from None
            if config.apns_ca_file and not os.path.exists(config.apns_ca_file):
                raise StartupError(f"[push] apns_ca_file = {config.apns_ca_file!r}: no such file")
            built["apns"] = ApnsProvider(
                run,
                config.apns_endpoint,
                key,
                config.apns_key_id,
                config.apns_team_id,
                config.apns_topic,
                config.timeout,
                verify=ssl.create_default_context(cafile=config.apns_ca_file)
                if config.apns_ca_file
                else True,
            )
        if config.webhook_url:
            from cim.push.providers.webhook import WebhookProvider

            try:
                secret = _read_secret(config.webhook_secret_file)
            except (OSError, ValueError) as exc:
                raise StartupError(
                    f"[push] webhook_secret_file = {config.webhook_secret_file!r}: {exc}"
                ) from None
            built["webhook"] = WebhookProvider(
                self.reactor, config.webhook_url, secret, config.timeout
            )
        return built

    async def stop(self) -> None:
        if self.decisions is not None:
            self.decisions.stop()
        self.queue.stop()
        try:
            await self.runner.when_idle()
            await self.providers.close()
        finally:
            await self.runner.stop()

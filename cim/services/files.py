"""The file service in the daemon: storage, signing key, thread pool, port, housekeeping.

Its HTTP is declared in ``cim.files.http``; its rules live in ``cim.files.store``.
Two jobs run on the node's clock: the sweep of expired uploads (every few minutes)
and the purge of deleted files (``cim.files.purge``, every ``purge_interval``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import server

from cim.config import FilesConfig
from cim.files.blobs import BlobStore
from cim.files.http.site import files_site
from cim.files.signing import UrlSigner, load_or_create_key
from cim.files.store import FileStore
from cim.files.thumbnails import set_pixel_limit
from cim.heap import map_large_allocations
from cim.http.limits import unguarded
from cim.http.telemetry import UNOBSERVED, SiteTelemetry
from cim.interfaces import ISessionStore
from cim.limits.policy import NO_LIMITS, RateLimits
from cim.reactor import ICimReactor
from cim.storage.database import Database, Runner, ThreadPoolRunner

__all__ = ["FilesListener", "purge_interval"]


def purge_interval(config: FilesConfig) -> float:
    """A quarter of the grace period, between a minute and an hour.

    A deleted file is gone at most this long after its grace period ends; the purge
    scans for unreferenced files, so it does not run much more often than that.
    """
    return min(3600.0, max(60.0, config.purge_grace / 4))


class FilesListener:
    """The file service in the daemon: storage, key, thread pool, port and sweeper."""

    _log = Logger()

    def __init__(
        self,
        config: FilesConfig,
        data_dir: str,
        database: Database,
        sessions: ISessionStore,
        reactor: ICimReactor,
        runner: Runner | None = None,
        limits: RateLimits = NO_LIMITS,
        telemetry: SiteTelemetry = UNOBSERVED,
        guard: Callable[[server.Site], IProtocolFactory] = unguarded,
    ) -> None:
        self.config = config
        self.limits = limits
        self.telemetry = telemetry
        self.guard = guard
        self.reactor = reactor
        self.storage_dir = config.storage_dir or os.path.join(data_dir, "files")
        self.key_path = config.url_key or os.path.join(data_dir, "files_url_key")
        self.work = ThreadPoolRunner("cim-files", config.threads, reactor, runner)
        self.blobs = BlobStore(self.storage_dir)
        self.database = database
        self.sessions = sessions
        self.store: FileStore | None = None
        self.port: IListeningPort | None = None
        self._sweeper: LoopingCall | None = None
        self._purger: LoopingCall | None = None

    def prepare(self) -> None:
        """Blocking, once at start-up: directories, the signing key, Pillow's limit."""
        self.blobs.prepare()
        signer = UrlSigner(load_or_create_key(self.key_path))
        set_pixel_limit(self.config.max_image_pixels)
        # Decoded images are freed back to the system, so [files] thumbnail_memory
        # bounds the RSS they cost and not only what is decoding at once.
        map_large_allocations()
        self.store = FileStore(
            self.config, self.database, self.blobs, self.work, signer, self.reactor
        )

    async def start(self) -> None:
        if self.store is None:
            self.prepare()
        store = self.store
        assert store is not None
        self.work.start()
        site = files_site(
            store,
            self.sessions,
            self.reactor,
            self.config.chunk_size,
            limits=self.limits,
            telemetry=self.telemetry,
        )
        endpoint = serverFromString(self.reactor, self.config.listen)
        try:
            self.port = await endpoint.listen(self.guard(site))
        except BaseException:
            await self.work.stop()
            raise
        store.public_url = self.config.public_url or self._derived_url()
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = self.reactor
        self._sweeper.start(min(300.0, self.config.upload_expiry / 4), now=True)
        self._purger = LoopingCall(self._purge)
        self._purger.clock = self.reactor
        self._purger.start(purge_interval(self.config), now=False)
        self._log.info(
            "files listening on {listen}, storage in {storage}, URLs under {url}",
            listen=self.config.listen,
            storage=self.storage_dir,
            url=store.public_url,
        )

    def _derived_url(self) -> str:
        assert self.port is not None
        address = self.port.getHost()
        host = getattr(address, "host", "127.0.0.1")
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
            self._log.warn(
                "[files] listens on every interface; URLs name {host}: set [files] public_url "
                "to the address clients should use",
                host=host,
            )
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.config.listen.startswith("ssl:") else "http"
        return f"{scheme}://{host}:{getattr(address, 'port', 0)}"

    async def _sweep(self) -> None:
        if self.store is None:
            return
        try:
            await self.store.sweep()
        except Exception:
            self._log.failure("sweeping expired uploads failed; trying again later")

    async def _purge(self) -> None:
        if self.store is None:
            return
        try:
            await self.store.purge()
        except Exception:
            self._log.failure("purging deleted files failed; trying again later")

    async def stop(self) -> None:
        for job in (self._sweeper, self._purger):
            if job is not None and job.running:
                job.stop()
        if self.port is not None:
            await maybeDeferred(self.port.stopListening)
            self.port = None
        await self.work.stop()

"""The file service in the daemon: storage and pool, then its port, then its housekeeping.

Its HTTP is declared in ``cim.files.http``; its rules live in ``cim.files.store``.
``FilesService`` is a small tree of its own (``cim.services.tree``), started in this
order and stopped in reverse:

1. ``FilesStorage``: the directories, the URL signing key, Pillow's pixel limit and the
   thread pool; at stop, the last thing: the pool drains the work already handed over.
2. the files ``Listener``: the port, once the storage behind it is ready; at stop it
   closes before the pool drains, so no new request arrives meanwhile.
3. ``FilesHousekeeping``: the URL the service names itself by (``[files] public_url``,
   or one derived from the port) and two jobs on the node's clock: the sweep of expired
   uploads (every few minutes) and the purge of deleted files (``cim.files.purge``,
   every ``purge_interval``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import server

from cim.backends.threads import BELOW_THE_REACTOR
from cim.config import FilesConfig
from cim.files.blobs import BlobStore
from cim.files.http.site import files_site
from cim.files.signing import KeyFileSigner, UrlKeyError
from cim.files.store import FileStore
from cim.files.thumbnails import set_pixel_limit
from cim.heap import map_large_allocations
from cim.http.limits import unguarded
from cim.http.telemetry import UNOBSERVED, SiteTelemetry
from cim.interfaces import ISessionStore
from cim.limits.policy import NO_LIMITS, RateLimits
from cim.reactor import ICimReactor
from cim.services.tree import AsyncService, Listener, OrderedServices
from cim.storage.database import Database, Runner, ThreadPoolRunner

__all__ = ["FilesHousekeeping", "FilesService", "FilesStorage", "purge_interval"]


def purge_interval(config: FilesConfig) -> float:
    """A quarter of the grace period, between a minute and an hour.

    A deleted file is gone at most this long after its grace period ends; the purge
    scans for unreferenced files, so it does not run much more often than that.
    """
    return min(3600.0, max(60.0, config.purge_grace / 4))


class FilesService(OrderedServices):
    """The file service in the daemon: storage, key and pool; port; sweep and purge.

    Making it reads and creates nothing: the store and the site are built around a key
    that ``FilesStorage`` loads when the service starts.
    """

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
        super().__init__("files")
        self.config = config
        self.storage_dir = config.storage_dir or os.path.join(data_dir, "files")
        self.key_path = config.url_key or os.path.join(data_dir, "files_url_key")
        work = ThreadPoolRunner(
            "cim-files", config.threads, reactor, runner, nice=BELOW_THE_REACTOR
        )
        signer = KeyFileSigner(self.key_path)
        blobs = BlobStore(self.storage_dir)
        self.store = FileStore(config, database, blobs, work, signer, reactor)
        site = files_site(
            self.store,
            sessions,
            reactor,
            config.chunk_size,
            limits=limits,
            telemetry=telemetry,
            cors_origins=config.cors_origins,
        )
        self.add(FilesStorage(config, self.storage_dir, blobs, signer, work))
        self.listener = self.add(Listener("files", config.listen, reactor, guard(site)))
        self.add(FilesHousekeeping(config, self.store, self.listener, reactor))


class FilesStorage(AsyncService):
    """What the port needs behind it: directories, the signing key, the pool."""

    def __init__(
        self,
        config: FilesConfig,
        storage_dir: str,
        blobs: BlobStore,
        signer: KeyFileSigner,
        work: ThreadPoolRunner,
    ) -> None:
        super().__init__("files storage")
        self.config = config
        self.storage_dir = storage_dir
        self.blobs = blobs
        self.signer = signer
        self.work = work

    def start(self) -> None:
        """Blocking, once at start-up: directories, the signing key, Pillow's limit."""
        self.blobs.prepare()
        self.signer.load()
        set_pixel_limit(self.config.max_image_pixels)
        # Decoded images are freed back to the system, so [files] thumbnail_memory
        # bounds the RSS they cost and not only what is decoding at once.
        map_large_allocations()
        self.work.start()

    def explain(self, exc: Exception) -> str | None:
        if isinstance(exc, UrlKeyError):
            return f"[files] url_key: {exc}"
        if isinstance(exc, OSError):
            return f"[files] storage_dir = {self.storage_dir!r}: cannot use it: {exc.strerror}"
        return None

    async def stop(self) -> None:
        """The work already handed over finishes; then the threads stop."""
        await self.work.stop()


class FilesHousekeeping(AsyncService):
    """The service's own URL once it listens, and the sweep and purge on the clock."""

    _log = Logger()

    def __init__(
        self, config: FilesConfig, store: FileStore, listener: Listener, clock: IReactorTime
    ) -> None:
        super().__init__("files housekeeping")
        self.config = config
        self.store = store
        self.listener = listener
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = clock
        self._purger = LoopingCall(self._purge)
        self._purger.clock = clock

    def start(self) -> None:
        self.store.public_url = self.config.public_url or self._derived_url()
        self._sweeper.start(min(300.0, self.config.upload_expiry / 4), now=True)
        self._purger.start(purge_interval(self.config), now=False)
        self._log.info(
            "files: storage in {storage}, URLs under {url}",
            storage=self.store.blobs.root,
            url=self.store.public_url,
        )

    def _derived_url(self) -> str:
        port = self.listener.port
        assert port is not None, "the URL is derived once the files port listens"
        address = port.getHost()
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
        try:
            await self.store.sweep()
        except Exception:
            self._log.failure("sweeping expired uploads failed; trying again later")

    async def _purge(self) -> None:
        try:
            await self.store.purge()
        except Exception:
            self._log.failure("purging deleted files failed; trying again later")

    def stop(self) -> None:
        for job in (self._sweeper, self._purger):
            if job.running:
                job.stop()

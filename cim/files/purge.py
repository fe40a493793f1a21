"""The purge: deleted files leave the disk once nobody may read them.

Deleting a file (DELETE /api/v1/files/{id}) or an account only takes away access;
the bytes go here, on the file service's clock. First, holdings deleted more than
``[files] purge_grace`` ago are forgotten, which gives their holders' quota back.
Then every file that nobody holds, nobody was sent one-to-one and no group member
can read loses its row, and its blob and thumbnail are removed.

Content is addressed by its SHA-256, so the same bytes may be uploaded again at the
very moment their old file is purged. The blob is therefore first moved aside, the
database asked once more whether the content is wanted (a new row, or an upload of
it under way), and put back if so; an upload that completes meanwhile places its own
copy again after its row is written (``FileStore._complete``). Several nodes may
purge the same shared storage at once: rows are claimed with ``SKIP LOCKED``, and
removing a file twice is harmless.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from cim.config import FilesConfig
from cim.files.blobs import BlobStore
from cim.storage import files_access
from cim.storage.database import Database, ThreadPoolRunner

__all__ = ["PURGE_BATCH", "Purge", "PurgeReport"]

PURGE_BATCH = 200


@dataclass(frozen=True)
class PurgeReport:
    holdings: int
    """Deleted holdings forgotten (their quota freed)."""
    files: int
    bytes: int


class Purge:
    _log = Logger()

    def __init__(
        self,
        config: FilesConfig,
        database: Database,
        blobs: BlobStore,
        work: ThreadPoolRunner,
        clock: IReactorTime,
    ) -> None:
        self.config = config
        self.database = database
        self.blobs = blobs
        self.work = work
        self.clock = clock

    async def __call__(self) -> PurgeReport:
        before = self.clock.seconds() - self.config.purge_grace
        holdings = 0
        while True:
            count = await self.database.run(files_access.forget_released_txn, before, PURGE_BATCH)
            holdings += count
            if count < PURGE_BATCH:
                break
        files = size = 0
        while True:
            purged = await self.database.run(files_access.purge_unreferenced_txn, PURGE_BATCH)
            if not purged:
                break
            moved = {}
            for item in purged:
                aside = functools.partial(self.blobs.set_aside, item.sha256, item.thumbnail)
                moved[item.sha256] = await self.work.run(aside)
            wanted = await self.database.run(files_access.contents_in_use_txn, purged)
            for sha256, pairs in moved.items():
                finish = self.blobs.put_back if sha256 in wanted else self.blobs.remove_aside
                await self.work.run(functools.partial(finish, pairs))
            files += len(purged)
            size += sum(item.size for item in purged if item.sha256 not in wanted)
            if len(purged) < PURGE_BATCH:
                break
        if files or holdings:
            self._log.info(
                "purged {files} files ({size} bytes); {holdings} deleted holdings freed",
                files=files,
                size=size,
                holdings=holdings,
            )
        return PurgeReport(holdings, files, size)

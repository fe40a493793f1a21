"""Catching up after a login: the summary first, then pages newest first.

The summary (OFFLINE_SUMMARY_R, one frame) lists the conversations with messages past
the device's cursor, newest activity first, and the cursors of the device's other
conversations (``caught_up``); both anchor the inbox's watermarks (``cim.client.inbox``),
so live messages are placed from then on. Then each listed conversation is pulled
(OFFLINE_R per conversation, pages newest first) in the summary's order, so the newest
page of the newest conversation reaches the application first, without waiting for
the rest:

- ``ordered=False`` (the default): every page is handed over as it comes, oldest first
  within the page; older pages follow. An application that shows conversations as a
  list of pages puts each above the last.
- ``ordered=True``: a conversation's pages are gathered and handed over oldest first, so
  the application sees every conversation in seq order (cim-client's listen, the
  console). Each conversation still goes as soon as its own pull ends.

Every OFFLINE_R carries the cursors of what is complete so far (``acks``), and
OFFLINE_ACK_R with the rest ends the pull; a cursor is the inbox's watermark, so a
message the application declined, or did not get because it stopped taking them,
stays past the cursor for the next catch-up. A summary saying ``more`` (more
conversations than one frame holds) is asked again once these are acknowledged.

Each request has its deadline and retries (``cim.client.answers``). A catch-up whose
requests still fail (a slow or refusing node) ends, and is started again after
``RETRY_BACKOFF`` while the connection lasts (``MAX_RETRIES`` times); one cut by a lost
connection ends, and the next login catches up. Either way its conversations go back
to live order with gap fills meanwhile.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cim.backends.backoff import Backoff
from cim.client.answers import Answers, RequestFailed
from cim.client.inbox import Inbox
from cim.protocols import cim_pb2

__all__ = ["CatchUp", "CatchUpResult"]

MAX_SUMMARY_ROUNDS = 50
"""Summaries asked in one catch-up when each says ``more``: a bound, not a target."""

MAX_RETRIES = 8
"""A catch-up that failed on the node's side (its requests unanswered or refused after
their own retries) is started again this many times, waiting ``RETRY_BACKOFF``."""

RETRY_BACKOFF = Backoff(initial=2.0, maximum=60.0, jitter=0.5)

MAX_EMPTY_PAGES = 3
"""Pages in a row that bring nothing yet say ``more`` before the pull gives up."""


@dataclass
class CatchUpResult:
    """What one catch-up did: messages handed over, conversations pulled."""

    handed: int = 0
    conversations: list[str] = field(default_factory=list)
    summary: cim_pb2.OfflineSummaryA | None = None


class CatchUp:
    """Pulls what a device missed; one catch-up at a time (another request joins it)."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        answers: Answers,
        inbox: Inbox,
        max_bytes: Callable[[], int],
        ordered: bool = False,
        page_size: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = clock
        self._rng = rng
        self._failures = 0
        self._retry: IDelayedCall | None = None
        self.answers = answers
        self.inbox = inbox
        self.ordered = ordered
        self.page_size = page_size
        self._max_bytes = max_bytes
        self._running: Deferred[CatchUpResult] | None = None
        self._again: set[str | None] = set()
        self._acks: list[cim_pb2.Cursor] = []
        self.last_summary: cim_pb2.OfflineSummaryA | None = None
        self.on_summary: Callable[[cim_pb2.OfflineSummaryA], object] = lambda summary: None
        self.bookkeeping: Callable[[cim_pb2.OfflineSummaryA], None] = lambda summary: None
        """The library's own state told every summary first (read marks, unread counts)."""
        """Told every summary, before its pull (the console's "while you were away")."""

    @property
    def running(self) -> bool:
        return self._running is not None

    def start(self, conversation: str | None = None) -> Deferred[CatchUpResult]:
        """Catch up on one conversation, or (None) on all of them after a summary.

        Fires with a ``CatchUpResult`` once the pull ended; never fails (a failed pull is
        logged and ends early). A call while one runs is done after it.
        """
        if self.inbox.closed:
            return Deferred.fromCoroutine(_nothing())
        if self._running is not None:
            self._again.add(conversation)
            return self._running
        self._running = Deferred.fromCoroutine(self._run(conversation))
        self._running.addCallbacks(self._succeeded, self._failed, errbackArgs=(conversation,))
        self._running.addBoth(self._ended)
        return self._running

    def stop(self) -> None:
        """No more retries (the session stops)."""
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _succeeded(self, result: CatchUpResult) -> CatchUpResult:
        self._failures = 0
        return result

    def _ended(self, result: CatchUpResult) -> CatchUpResult:
        self._running = None
        if self._again and not self.inbox.closed:
            # Everything covers any one conversation; otherwise one after the other.
            first = None if None in self._again else min(c for c in self._again if c)
            self._again = set() if first is None else self._again - {first}
            self.start(first)
        return result

    def _failed(self, failure: Failure, conversation: str | None) -> CatchUpResult:
        self._acks = []
        if not failure.check(RequestFailed) or self._failures >= MAX_RETRIES:
            # A lost connection: the next login catches up.
            self.log.info("catch-up interrupted: {why}", why=failure.getErrorMessage())
            return CatchUpResult()
        # The node is slow or refused for now: the same catch-up again, later.
        wait = RETRY_BACKOFF.delay(self._failures, self._rng)
        self._failures += 1
        self.log.info(
            "catch-up failed ({why}); again in {wait:.1f} s",
            why=failure.getErrorMessage(),
            wait=wait,
        )
        self.stop()
        self._retry = self.clock.callLater(wait, self._again_now, conversation)
        return CatchUpResult()

    def _again_now(self, conversation: str | None) -> None:
        self._retry = None
        if self.answers.connected and not self.inbox.closed:
            self.start(conversation)

    async def _run(self, conversation: str | None) -> CatchUpResult:
        result = CatchUpResult()
        if conversation is not None:
            watermark = self.inbox.watermark(conversation) or 0
            await self._pull(conversation, watermark, 0, result)
        else:
            await self._all(result)
        await self._finish(result)
        return result

    async def _all(self, result: CatchUpResult) -> None:
        for _ in range(MAX_SUMMARY_ROUNDS):
            summary = await self.summary()
            result.summary = result.summary or summary
            waiting = []
            for entry in summary.conversations:
                shown = self.inbox.watermark(entry.conversation) or 0
                if entry.count and shown >= entry.last_seq:
                    # Shown live before (the cursor lagged): only the cursor moves.
                    self._acks.append(cim_pb2.Cursor(conversation=entry.conversation, seq=shown))
                elif entry.count:
                    waiting.append(entry)
            # All of them wait for their pull rather than fill live gaps on their own.
            for entry in waiting:
                self.inbox.begin_catch_up(entry.conversation, entry.cursor)
            try:
                while waiting and not self.inbox.closed:
                    entry = waiting.pop(0)
                    await self._pull(entry.conversation, entry.cursor, entry.last_seq, result)
            finally:
                for entry in waiting:
                    self.inbox.end_catch_up(entry.conversation, 0, complete=False)
            if not summary.more or not summary.conversations or self.inbox.closed:
                return
            await self._finish(result)  # the next summary lists what these cursors leave

    async def summary(self) -> cim_pb2.OfflineSummaryA:
        """Ask for the summary and anchor the inbox's watermarks with it."""
        request = cim_pb2.OfflineSummaryR(max_bytes=self._max_bytes())
        self.inbox.summary_pending = True
        try:
            summary: cim_pb2.OfflineSummaryA = await self.answers.ask(
                cim_pb2.OFFLINE_SUMMARY_R, request
            )
        except Exception:
            self.inbox.summary_done(complete=False)
            raise
        self.last_summary = summary
        for cursor in summary.caught_up:
            self.inbox.anchor(cursor.conversation, cursor.seq)
        for entry in summary.conversations:
            self.inbox.anchor(entry.conversation, entry.cursor, entry.peer, entry.group)
        self.bookkeeping(summary)
        self.inbox.summary_done(complete=not summary.more)
        try:
            self.on_summary(summary)
        except Exception:
            self.log.failure("on_summary raised")
        return summary

    async def _pull(
        self, conversation: str, cursor: int, last_seq: int, result: CatchUpResult
    ) -> None:
        """Every page of ``conversation`` past the device's cursor, newest first."""
        self.inbox.begin_catch_up(conversation, cursor)
        result.conversations.append(conversation)
        gathered: list[cim_pb2.Message] = []
        through = last_seq
        complete = False
        try:
            before, empty = 0, 0
            while not self.inbox.closed:
                page = await self._page(conversation, before)
                through = max([through, *(m.seq for m in page.messages)])
                if self.ordered:
                    gathered.extend(page.messages)
                else:
                    result.handed += self.inbox.catch_up_page(conversation, page.messages)
                empty = 0 if page.messages else empty + 1
                if not page.more or not page.next_before or empty >= MAX_EMPTY_PAGES:
                    complete = not page.more
                    break
                before = page.next_before
            if self.ordered:
                result.handed += self.inbox.catch_up_page(conversation, gathered)
        finally:
            done = complete and not self.inbox.closed
            watermark = self.inbox.end_catch_up(conversation, through, done)
        if watermark > cursor:
            self._acks.append(cim_pb2.Cursor(conversation=conversation, seq=watermark))

    async def _page(self, conversation: str, before: int) -> cim_pb2.OfflineA:
        acks, self._acks = self._acks, []
        request = cim_pb2.OfflineR(
            conversation=conversation,
            before=before,
            limit=self.page_size,
            max_bytes=self._max_bytes(),
            acks=acks,
        )
        try:
            page: cim_pb2.OfflineA = await self.answers.ask(cim_pb2.OFFLINE_R, request)
        except Exception:
            self._acks = acks + self._acks  # not sent for sure: OFFLINE_ACK_R takes them
            raise
        return page

    async def _finish(self, result: CatchUpResult) -> None:
        """OFFLINE_ACK_R with the cursors not yet sent: it ends a pull."""
        acks, self._acks = self._acks, []
        if not acks and not result.conversations:
            return  # nothing was pulled: there is no pull to end
        request = cim_pb2.OfflineAckR(cursors=acks)
        await self.answers.ask(cim_pb2.OFFLINE_ACK_R, request)


async def _nothing() -> CatchUpResult:
    return CatchUpResult()

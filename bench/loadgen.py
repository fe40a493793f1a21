"""The load-generator worker: one process, many clients, driven by JSON lines on stdin.

Run as ``python -m bench.loadgen`` (``bench.run`` starts several, pinned to the core
the daemon does not use). Each command is one JSON object on a line; each answer is
one JSON object on a line of stdout. Nothing else is ever written to stdout.

The clients speak the real protocol (router login over HTTP, the RSA handshake,
sealed frames, the six packets, heartbeats), but as little else as possible, so that
the daemon and not this process is the side that runs out of CPU:

- frames a client does not need to read are opened (they must be: the frame
  counters and the RC4 keystream move on) but not parsed;
- a msg:R is a precomputed prefix plus a send timestamp and a sequence number, and
  an ack:R is two bytes plus a varint, so neither goes through protobuf;
- everything a connection has to send in reaction to one read is sealed into a list
  and written with one ``transport.write`` at the end of that read;
- heartbeats come from one sweep per worker per second, not a timer per connection;
- group messages are acknowledged cumulatively, as the client library does
  (``cim.client.acks``): one ack:R per conversation for every ``GROUP_ACK_EVERY``
  messages, the rest by a sweep per worker every ``GROUP_ACK_DELAY``; 1:1 messages
  are acknowledged one by one, at once;
- the router login uses a bare HTTP/1.1 keep-alive connection, not an HTTP library.

Counting is exact, whatever happens: every msg:R sent ends counted once, as
delivered (ack:N DELIVERED), accepted (ack:N ACCEPTED: a group message the node took
to fan out), stored (ack:N STORED: kept for an offline receiver) or failed (ack:N
FAILED, an ERROR frame, the connection closing with it unanswered, or still
unanswered at the drain deadline). So ``sent == delivered + accepted + stored +
failed`` always holds after a drain; ``tests/{unit,integration}/test_bench.py`` checks it. Receivers
count every msg:N they get (1:1 or group) and, per ack:A, the msg:N its ack:R stood for
(``acks_answered``: every msg:N acknowledged once the counts are equal).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.stdio import StandardIO
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from bench.clients import DEVICE, BenchConnection, BenchError, HttpLogin, Totals, with_timeout
from cim.client.acks import GROUP_ACK_DELAY
from cim.client.router import LoginTicket, NodeTarget, RouterError, parse_ticket
from cim.config import KNOWN_SUITES
from cim.protocols import cim_pb2
from cim.protocols.handshake import Resumption

reactor: Any = _reactor
# --------------------------------------------------------------------------- worker


class Worker:
    """All the clients of one process and the commands that drive them."""

    def __init__(self, router: str, im_override: tuple[str, int] | None = None) -> None:
        host, _, port = router.removeprefix("http://").partition(":")
        self.router_host = host
        self.router_port = int(port or 80)
        self.im_override = im_override
        self.single_suite = True
        self.transport = "tcp"
        """tcp, or websocket: the node's gateway (the login's ws_url), as a browser."""
        self.tickets: dict[str, LoginTicket] = {}
        self.resumptions: dict[str, Resumption] = {}
        """Each user's resumption ticket from its last connection (``connect`` with
        ``resume`` uses them)."""
        self.conns: list[BenchConnection] = []
        self.live: set[BenchConnection] = set()
        self.retired = Totals()
        self.failure_reasons: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.latencies: list[int] | None = None
        self.loading = False
        self._senders: list[BenchConnection] = []
        self._pacer: LoopingCall | None = None
        self._mark: dict[str, Any] = {}
        self._heartbeats = LoopingCall(self._heartbeat_sweep)
        self._heartbeats.clock = reactor
        self._group_acks = LoopingCall(self._group_ack_sweep)
        self._group_acks.clock = reactor

    # --- bookkeeping ------------------------------------------------------------------

    def retire(self, conn: BenchConnection) -> None:
        self.retired.add(conn)
        conn.sent = conn.delivered = conn.failed = conn.received = 0
        conn.accepted = conn.stored = conn.acks_answered = 0
        conn.heartbeats_sent = conn.heartbeats_received = 0

    def totals(self) -> Totals:
        totals = Totals()
        totals.add(self.retired)
        for conn in self.live:
            totals.add(conn)
        return totals

    def _heartbeat_sweep(self) -> None:
        now = time.monotonic()
        for conn in self.live:
            if now - conn.last_out >= conn.heartbeat_interval:
                conn.send_heartbeat_frame()

    def _group_ack_sweep(self) -> None:
        for conn in self.live:
            if conn.owed:
                conn.flush_group_acks()

    def start_heartbeats(self) -> None:
        if not self._heartbeats.running:
            self._heartbeats.start(1.0, now=False)
        if not self._group_acks.running:
            self._group_acks.start(GROUP_ACK_DELAY, now=False)

    # --- router -----------------------------------------------------------------------

    async def _router_connection(self) -> HttpLogin:
        endpoint = TCP4ClientEndpoint(reactor, self.router_host, self.router_port, timeout=10)
        protocol = HttpLogin(f"{self.router_host}:{self.router_port}")
        await with_timeout(connectProtocol(endpoint, protocol), 15)
        return protocol

    async def login_one(
        self, http: HttpLogin | None, user: str, password: str
    ) -> tuple[HttpLogin, LoginTicket]:
        """Log ``user`` in through the router, reconnecting once if keep-alive broke."""
        for attempt in range(2):
            if http is None or not http.connected_ok:
                http = await self._router_connection()
            try:
                status, body = await with_timeout(http.login(user, password, DEVICE), 60)
            except BenchError:
                if attempt:
                    raise
                http = None
                continue
            if status != 200:
                raise BenchError(f"router answered {status} {body.get('error', '')}".strip())
            try:
                ticket = parse_ticket(body)
            except RouterError as error:
                raise BenchError(error.code) from None
            if self.im_override is not None:
                # A node listening on 0.0.0.0 may advertise a name this host cannot use.
                host, port = self.im_override
                ticket = dataclasses.replace(
                    ticket, node=NodeTarget(ticket.node.node_id, host, port)
                )
            return http, ticket
        raise BenchError("router unreachable")

    async def cmd_login(self, spec: dict[str, Any]) -> dict[str, Any]:
        names = _names(spec)
        password = str(spec["password"])
        started = time.monotonic()
        ok = 0
        todo = iter(names)

        async def slot() -> None:
            nonlocal ok
            http: HttpLogin | None = None
            for user in todo:
                try:
                    http, ticket = await self.login_one(http, user, password)
                except Exception as exc:
                    self.errors[f"login: {_label(exc)}"] += 1
                    http = None
                    continue
                self.tickets[user] = ticket
                ok += 1
            if http is not None and http.transport is not None:
                http.transport.loseConnection()

        await _gather(slot() for _ in range(int(spec.get("concurrency", 8))))
        return {"logged_in": ok, "failed": len(names) - ok, "seconds": time.monotonic() - started}

    # --- IM connections ---------------------------------------------------------------

    async def open(
        self,
        ticket: LoginTicket,
        suite: str,
        timeout: float = 30.0,
        resume: Resumption | None = None,
    ) -> BenchConnection:
        conn = BenchConnection(self, ticket, suite, resume)
        if self.transport == "websocket":
            from cim.client.websocket import connect_websocket

            await with_timeout(connect_websocket(reactor, ticket.node.ws_url, conn), timeout)
        else:
            endpoint = TCP4ClientEndpoint(reactor, ticket.node.host, ticket.node.port, timeout=10)
            await with_timeout(connectProtocol(endpoint, conn), timeout)
        await with_timeout(conn.ready, timeout)
        return conn

    async def cmd_connect(self, spec: dict[str, Any]) -> dict[str, Any]:
        names = _names(spec)
        suite = str(spec.get("suite", KNOWN_SUITES[0]))
        self.single_suite = bool(spec.get("single_suite", True))
        self.transport = str(spec.get("transport", "tcp"))
        # resume: each user comes back with the ticket of its last connection (no RSA).
        resume = bool(spec.get("resume", False))
        started = time.monotonic()
        opened: dict[str, BenchConnection] = {}
        todo = iter(names)

        async def slot() -> None:
            for user in todo:
                ticket = self.tickets.get(user)
                if ticket is None:
                    self.errors["connect: not logged in"] += 1
                    continue
                resumption = self.resumptions.pop(user, None) if resume else None
                if resume and resumption is None:
                    self.errors["connect: no resumption ticket"] += 1
                    continue
                try:
                    opened[user] = await self.open(ticket, suite, resume=resumption)
                except Exception as exc:
                    self.errors[f"connect: {_label(exc)}"] += 1

        await _gather(slot() for _ in range(int(spec.get("concurrency", 16))))
        seconds = time.monotonic() - started
        # Keep the order of the names, so pairs are the same whatever finished first.
        self.conns = [opened[user] for user in names if user in opened]
        self.start_heartbeats()
        return {
            "connected": len(self.conns),
            "failed": len(names) - len(self.conns),
            "seconds": seconds,
            "errors": dict(self.errors),
        }

    async def cmd_close(self, spec: dict[str, Any]) -> dict[str, Any]:
        conns = list(self.live)
        waits = [conn.closed for conn in conns]
        for conn in conns:
            if conn.transport is not None:
                conn.transport.loseConnection()
        await _gather_deferreds(waits, float(spec.get("timeout", 30)))
        self.conns = []
        return {"closed": len(conns), "still_open": len(self.live)}

    # --- 1:1 load ---------------------------------------------------------------------

    def _pair_up(self, redirect: dict[str, str]) -> list[BenchConnection]:
        """Connections 0-1, 2-3, ... are pairs; the even one sends to the odd one.

        ``redirect`` sends some senders' messages elsewhere (a user who is offline or
        does not exist), so a test can see failures being counted.
        """
        senders = []
        for index in range(0, len(self.conns) - 1, 2):
            sender, receiver = self.conns[index], self.conns[index + 1]
            sender.aim_at(redirect.get(sender.user, receiver.user))
            senders.append(sender)
        return senders

    async def cmd_load(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Start sending; the answer comes at once, the load runs until stop_load.

        ``window``: each sender keeps that many msg:R unanswered and sends the next on
        each ack:N. ``rate``: this worker's senders together send that many per
        second, paced every millisecond, each sender capped at ``max_in_flight``.
        """
        group = spec.get("group")
        if group:
            # The first ``senders`` connections post to the group; every connection
            # (senders included) is a member and receives the others' messages.
            self._senders = self.conns[: int(spec.get("senders", 1))]
            for sender in self._senders:
                sender.aim_at(str(group), group=True)
        else:
            self._senders = self._pair_up(dict(spec.get("redirect", {})))
        if not self._senders:
            raise BenchError("no pairs connected")
        self.loading = True
        if "rate" in spec:
            self._start_pacer(float(spec["rate"]), int(spec.get("max_in_flight", 1000)))
        else:
            window = int(spec["window"])
            now = time.monotonic_ns()
            for sender in self._senders:
                sender.window = window
                for _ in range(window):
                    sender.queue_message(now)
                sender.flush()
        return {"senders": len(self._senders)}

    def _start_pacer(self, rate: float, max_in_flight: int) -> None:
        senders = self._senders
        started = time.monotonic()
        sent = 0
        turn = 0

        def tick() -> None:
            nonlocal sent, turn
            due = int(rate * (time.monotonic() - started)) - sent
            if due <= 0:
                return
            now = time.monotonic_ns()
            touched = set()
            count = len(senders)
            for _ in range(due):
                sender = senders[turn]
                turn = (turn + 1) % count
                if len(sender.pending) >= max_in_flight:
                    self.errors["rate: sender at max_in_flight, message skipped"] += 1
                    continue
                sender.queue_message(now)
                touched.add(sender)
            sent += due
            for sender in touched:
                sender.flush()

        self._pacer = LoopingCall(tick)
        self._pacer.clock = reactor
        self._pacer.start(0.001, now=True)

    def cmd_mark(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Start a measured interval: counts and latencies from here on."""
        self._mark = {"at": time.monotonic(), "totals": self.totals().as_dict()}
        self.latencies = [] if spec.get("latency") else None
        return {}

    def cmd_report(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Counts since the mark, and the latency samples (µs) if they were recorded."""
        delta = self.totals().minus(self._mark.get("totals", {}))
        latencies, self.latencies = self.latencies, None
        return {
            "seconds": time.monotonic() - self._mark.get("at", time.monotonic()),
            "counts": delta,
            "latencies_us": latencies if latencies is not None else [],
        }

    async def cmd_stop_load(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Stop sending, wait (bounded) for every outcome, then give the exact totals."""
        self.loading = False
        if self._pacer is not None and self._pacer.running:
            self._pacer.stop()
        self._pacer = None
        for sender in self._senders:
            sender.window = 0
        waits = [sender.until_drained() for sender in self._senders]
        drained = await _gather_deferreds(waits, float(spec.get("timeout", 30)))
        for sender in self._senders:
            sender.give_up_pending("unanswered at the drain deadline")
        return {"drained": drained, **self._exact_totals()}

    def _exact_totals(self) -> dict[str, Any]:
        totals = self.totals().as_dict()
        return {
            "totals": totals,
            "failure_reasons": dict(self.failure_reasons),
            "errors": dict(self.errors),
        }

    def cmd_totals(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._exact_totals()

    # --- groups -----------------------------------------------------------------------

    async def cmd_group_create(self, spec: dict[str, Any]) -> dict[str, Any]:
        """This worker's first connection creates a group of the named users.

        Over the protocol, as a real client does it (one GROUP_R create naming the
        members; the creator becomes the owner), so the daemon's own checks run and
        the rows are whatever the daemon writes. Members who are not the creator's
        contacts are invited (docs/privacy.md): those connected here accept, as their
        clients would. Answers with the group's id.
        """
        if not self.conns:
            raise BenchError("group_create needs a connected creator")
        creator = self.conns[0]
        request = cim_pb2.GroupRequest(
            request_id=1,
            create=cim_pb2.CreateGroup(name=str(spec.get("name", "bench")), members=_names(spec)),
        )
        plaintext = await with_timeout(
            creator.request(cim_pb2.GROUP_R, request.SerializeToString(), cim_pb2.GROUP_A), 60
        )
        answer = cim_pb2.GroupAnswer.FromString(plaintext[1:])
        if not answer.ok:
            raise BenchError(f"group create refused: {answer.error}: {answer.message}")
        invited = list(answer.invited)
        joined = await self._accept_invitations(answer.group.id, invited)
        return {
            "group": answer.group.id,
            "member_count": max(answer.group.member_count, joined),
            "creator": creator.user,
            "invited": invited,
        }

    async def cmd_group_join(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The invited members connected to this worker accept (``group_create`` ran on
        another worker): answers with the member count the last acceptance saw."""
        joined = await self._accept_invitations(str(spec["group"]), list(spec["invited"]))
        return {"member_count": joined}

    async def _accept_invitations(self, group: str, invited: list[str]) -> int:
        """Each of ``invited`` connected here accepts, as its client would; returns the
        member count after the last acceptance (0 if none was made here)."""
        names = set(invited)
        member_count = 0
        for conn in self.conns:
            if conn.user not in names:
                continue
            accept = cim_pb2.GroupRequest(request_id=2, accept=cim_pb2.GroupRef(group=group))
            plaintext = await with_timeout(
                conn.request(cim_pb2.GROUP_R, accept.SerializeToString(), cim_pb2.GROUP_A), 60
            )
            joined = cim_pb2.GroupAnswer.FromString(plaintext[1:])
            if not joined.ok:
                raise BenchError(f"{conn.user} could not join: {joined.error}: {joined.message}")
            member_count = joined.group.member_count
        return member_count

    # --- offline messages ---------------------------------------------------------------

    async def cmd_fill(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Exactly ``count`` msg:R to ``to`` from this worker's connections, then wait.

        Each connection keeps ``window`` unanswered and sends the next on each ack:N
        until its share is sent; the answer comes once every outcome is in (or the
        deadline passed: what is left is counted as failed). For an offline ``to``,
        each ack:N STORED means the daemon has the message in its store (or, with
        RabbitMQ, in the offline queue on its way there).
        """
        senders = list(self.conns)
        if not senders:
            raise BenchError("fill needs connected senders")
        to = str(spec["to"])
        count = int(spec["count"])
        window = max(1, int(spec.get("window", 8)))
        before = self.totals().as_dict()
        started = time.monotonic()
        self._senders = senders
        self.loading = True
        now = time.monotonic_ns()
        base, extra = divmod(count, len(senders))
        for index, sender in enumerate(senders):
            share = base + (1 if index < extra else 0)
            sender.aim_at(to)
            sender.window = window
            sender.budget = share
            for _ in range(min(window, share)):
                sender.queue_message(now)
            sender.flush()
        waits = [sender.until_drained() for sender in senders]
        drained = await _gather_deferreds(waits, float(spec.get("timeout", 300)))
        self.loading = False
        for sender in senders:
            sender.window = 0
            sender.budget = -1
            sender.give_up_pending("unanswered at the fill deadline")
        return {
            "drained": drained,
            "seconds": time.monotonic() - started,
            "counts": self.totals().minus(before),
            **self._exact_totals(),
        }

    async def cmd_offline_pull(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Log ``user`` in and pull every stored message the way the client library does.

        Router login, handshake, then OFFLINE_R pages newest first (``before`` = the
        previous page's ``next_before``) until ``more`` is false; then, oldest first,
        OFFLINE_ACK_R in chunks of ``ack_chunk`` ids, each answered by OFFLINE_ACK_A
        with how many the store deleted (``cim.client.session``: ``_pull`` and
        ``_flush_offline_acks``). Every page is parsed in full, as the client's is.
        After the timed part, one more OFFLINE_R checks that nothing is left.
        """
        user = str(spec["user"])
        suite = str(spec.get("suite", KNOWN_SUITES[0]))
        limit = int(spec.get("limit", 0))
        ack_chunk = int(spec.get("ack_chunk", 1000))
        max_pages = int(spec.get("max_pages", 100_000))
        started = time.monotonic()
        http, ticket = await self.login_one(None, user, str(spec["password"]))
        if http.transport is not None:
            http.transport.loseConnection()
        logged_in = time.monotonic()
        conn = await self.open(ticket, suite)
        connected = time.monotonic()
        ids: list[int] = []
        senders: Counter[str] = Counter()
        marks: dict[str, int] = {}
        pages = 0
        before = 0
        while True:
            ask = cim_pb2.OfflineR(before=before, limit=limit).SerializeToString()
            plaintext = await with_timeout(
                conn.request(cim_pb2.OFFLINE_R, ask, cim_pb2.OFFLINE_A), 60
            )
            page = cim_pb2.OfflineA.FromString(plaintext[1:])
            pages += 1
            for message in page.messages:
                ids.append(message.id)
                senders[getattr(message, "from")] += 1
                marks[message.conversation] = max(marks.get(message.conversation, 0), message.seq)
            if not page.more:
                break
            if pages >= max_pages:
                raise BenchError(f"still more after {pages} pages")
            before = page.next_before
        pulled = time.monotonic()
        oldest_first = sorted(set(ids))
        # Timelines (#14): acknowledging is moving a cursor per conversation.
        cursors = [cim_pb2.Cursor(conversation=c, seq=s) for c, s in sorted(marks.items())]
        waits = [
            conn.request(
                cim_pb2.OFFLINE_ACK_R,
                cim_pb2.OfflineAckR(cursors=cursors[i : i + ack_chunk]).SerializeToString(),
                cim_pb2.OFFLINE_ACK_A,
            )
            for i in range(0, len(cursors), ack_chunk)
        ]
        acknowledged = 0
        for waiting in waits:
            answer = await with_timeout(waiting, 60)
            acknowledged += cim_pb2.OfflineAckA.FromString(answer[1:]).acknowledged
        done = time.monotonic()
        check = cim_pb2.OfflineR().SerializeToString()
        left = cim_pb2.OfflineA.FromString(
            (await with_timeout(conn.request(cim_pb2.OFFLINE_R, check, cim_pb2.OFFLINE_A), 60))[1:]
        )
        return {
            "pulled": len(ids),
            "unique": len(oldest_first),
            "pages": pages,
            "acknowledged": acknowledged,
            "left_after": len(left.messages),
            "senders": dict(senders),
            "login_seconds": logged_in - started,
            "handshake_seconds": connected - logged_in,
            "pull_seconds": pulled - connected,
            "ack_seconds": done - pulled,
            "seconds": done - started,
        }

    # --- churn ------------------------------------------------------------------------

    async def cmd_churn(self, spec: dict[str, Any]) -> dict[str, Any]:
        """``cycles`` times: router login, handshake, ``messages`` to the sink, close.

        The sink is this worker's first connection (from ``connect``); each
        concurrent churner uses its own user, so every login replaces the previous
        session of that user, as a real reconnecting client's would.
        """
        if not self.conns:
            raise BenchError("churn needs a connected sink")
        sink = self.conns[0].user
        users = _names(spec)
        password = str(spec["password"])
        suite = str(spec.get("suite", KNOWN_SUITES[0]))
        messages = int(spec.get("messages", 4))
        remaining = int(spec["cycles"])
        done = 0
        started = time.monotonic()

        async def churner(user: str) -> None:
            nonlocal remaining, done
            http: HttpLogin | None = None
            while remaining > 0:
                remaining -= 1
                try:
                    http, ticket = await self.login_one(http, user, password)
                    conn = await self.open(ticket, suite)
                except Exception as exc:
                    self.errors[f"churn: {_label(exc)}"] += 1
                    http = None
                    continue
                conn.aim_at(sink)
                now = time.monotonic_ns()
                for _ in range(messages):
                    conn.queue_message(now)
                conn.flush()
                try:
                    await with_timeout(conn.until_drained(), 30)
                except Exception:
                    conn.give_up_pending("unanswered at the churn deadline")
                conn.tcp.loseConnection()
                await conn.closed
                done += 1
            if http is not None and http.transport is not None:
                http.transport.loseConnection()

        await _gather(churner(user) for user in users)
        return {"cycles": done, "seconds": time.monotonic() - started, **self._exact_totals()}


def _names(spec: dict[str, Any]) -> list[str]:
    """User names from a compact spec: ``prefix`` + numbers ``start`` .. ``start+count-1``."""
    prefix = str(spec["prefix"])
    start = int(spec.get("start", 0))
    return [f"{prefix}{number}" for number in range(start, start + int(spec["count"]))]


def _label(exc: BaseException) -> str:
    if isinstance(exc, BenchError):
        return str(exc)
    return type(exc).__name__


async def _gather(coroutines: Iterable[Coroutine[Any, Any, None]]) -> None:
    deferreds = [ensureDeferred(coroutine) for coroutine in coroutines]
    for d in deferreds:
        await d


async def _gather_deferreds(waits: list[Deferred[None]], timeout: float) -> bool:
    """Wait for all, at most ``timeout`` seconds; True if all fired in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(d.called for d in waits):
            return True
        await deferLater(reactor, 0.01, lambda: None)
    return all(d.called for d in waits)


# ------------------------------------------------------------------- command channel


class Commands(LineReceiver):
    """stdin: one JSON command per line; stdout: one JSON answer per command."""

    delimiter = b"\n"
    MAX_LENGTH = 64 << 20

    def __init__(self) -> None:
        self.worker: Worker | None = None

    def lineReceived(self, line: bytes) -> None:
        if not line.strip():
            return
        command = json.loads(line)
        ensureDeferred(self._run(command))

    async def _run(self, command: dict[str, Any]) -> None:
        name = str(command.get("cmd"))
        answer: dict[str, Any] = {"cmd": name, "id": command.get("id"), "pid": os.getpid()}
        try:
            if name == "init":
                override = command.get("im_override")
                self.worker = Worker(str(command["router"]), tuple(override) if override else None)
                result: dict[str, Any] = {}
            elif name == "exit":
                result = {}
                reactor.callLater(0, reactor.stop)
            else:
                result = await self._dispatch(name, command)
            answer.update(result, ok=True)
        except Exception as exc:
            answer.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        self.transport.write(json.dumps(answer).encode() + b"\n")  # type: ignore[union-attr]

    async def _dispatch(self, name: str, command: dict[str, Any]) -> dict[str, Any]:
        worker = self.worker
        if worker is None:
            raise BenchError("send init first")
        handler: Callable[[dict[str, Any]], Any] | None = getattr(worker, f"cmd_{name}", None)
        if handler is None:
            raise BenchError(f"unknown command {name!r}")
        result = handler(command)
        if isinstance(result, dict):
            return result
        awaited: dict[str, Any] = await result
        return awaited

    def connectionLost(self, reason: Failure | None = None) -> None:
        # The parent went away: nobody is left to read the answers.
        if reactor.running:
            reactor.stop()


def main() -> None:
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])],
        redirectStandardIO=False,
    )
    StandardIO(Commands())
    reactor.run()


if __name__ == "__main__":
    main()

"""cim-client send, listen, sync, online, devices, history, typing, read: the IM
connection's commands.

Only ``listen`` (and the console) take received messages: they print the catch-up, each
conversation oldest first and each message once, then live messages, and acknowledge
what they printed; ``listen`` prints typing notices too (``"event": "typing"``), which
are never stored and not counted by ``--count``, a recall or edit as a line with
``event`` "recall" or "edit", and read notices as ``"event": "read"`` lines. The others
move no cursor: ``sync`` prints the catch-up summary (unread per conversation) without
taking anything, ``history`` reads a timeline whatever the cursors, ``typing`` sends one
notice, ``read`` marks a conversation read (the user's other devices and a 1:1 peer
hear of it).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from twisted.logger import Logger

from cim.json_convention import iso_time, listing
from cim.reactor import ICimReactor
from cim.scripts.arguments import message_id, positive
from cim.scripts.group_commands import REFUSED_CODES, resolve_group
from cim.scripts.login import with_timeout
from cim.scripts.output import (
    EXIT_CONNECTION_LOST,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    ClientExit,
    OutputClosed,
    emit,
    write_line,
)
from cim.scripts.records import (
    change_record,
    message_json,
    outcome_record,
    summary_record,
    typing_json,
)

HISTORY_PAGE = 200
"""The most the node answers per HISTORY_R."""

log = Logger(namespace="cim-client")


def add_chat_commands(commands: Any) -> None:
    send = commands.add_parser("send", help="send a text and wait for its outcome")
    send.add_argument("to")
    send.add_argument("text")
    send.add_argument(
        "--timeout",
        type=float,
        default=200.0,
        help="seconds to wait for the outcome (the library retries for up to 160 s)",
    )
    listen = commands.add_parser(
        "listen",
        help="print unread messages (each conversation oldest first), then live ones, "
        "as JSON lines",
    )
    listen.add_argument("--count", type=positive, default=0, help="print N messages, then exit 0")
    listen.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="stop after S seconds: exit 0, or 1 if --count messages had not come",
    )
    listen.add_argument(
        "--no-reconnect",
        action="store_true",
        help="exit with status 5 when the connection is lost (default: reconnect)",
    )
    commands.add_parser(
        "sync",
        help="print what is unread, per conversation (newest activity first), as JSON; "
        "takes nothing",
    )
    commands.add_parser(
        "online", help="list who of your contacts (and bound accounts) is online, as JSON"
    )
    commands.add_parser("devices", help="list your own devices online now (this one too), as JSON")
    history = commands.add_parser(
        "history", help="print a conversation's archived messages as JSON lines, newest first"
    )
    history.add_argument("peer", help="the other user (or the group, with --group)")
    history.add_argument("--group", action="store_true", help="PEER names a group (id or name)")
    history.add_argument(
        "--limit", type=positive, default=50, help="messages to print (default 50)"
    )
    history.add_argument(
        "--before",
        type=message_id,
        default=0,
        help="only messages older than this seq (the last one printed, to go on)",
    )
    typing = commands.add_parser(
        "typing",
        help='tell TO (or a group\'s other members) that you are typing; prints "sent" '
        'or "dropped" (one per conversation every 3 s goes on)',
    )
    typing.add_argument("to", nargs="?", default="", help="the other user")
    typing.add_argument("--group", default="", metavar="G", help="a group (id or name)")
    typing.add_argument("--stopped", action="store_true", help='say "stopped" instead of "typing"')


def add_read_command(commands: Any) -> None:
    read = commands.add_parser(
        "read", help="mark a conversation read up to SEQ (default: its newest message)"
    )
    read.add_argument(
        "conversation",
        metavar="CONVERSATION",
        help="the other user, a group (with --group), or a conversation key (d:... / g:...)",
    )
    read.add_argument("seq", nargs="?", type=positive, default=None, help="read up to here")
    read.add_argument("--group", action="store_true", help="CONVERSATION names a group")


async def read_command(client: Any, options: argparse.Namespace) -> int:
    """Mark read; prints the mark in effect (``moved`` false: it was already there).
    A seq past the end is refused (exit 1), a conversation not yours too (exit 4)."""
    from cim.client.answers import RequestRefused
    from cim.client.reads import conversation_key
    from cim.protocols import cim_pb2

    name = await resolve_group(client, options.conversation) if options.group else None
    key = conversation_key(client.user, name or options.conversation, group=bool(name))
    seq = options.seq
    if seq is None:
        await client.offline_summary()  # the newest seq of each conversation; takes nothing
        seq = client.reads.newest(key)
        if not seq:
            raise ClientExit(EXIT_FAILED, f"no messages in {key} to mark read")
    try:
        answer = await client.mark_read(key, seq)
    except RequestRefused as refused:
        forbidden = refused.code == cim_pb2.Error.FORBIDDEN
        status = EXIT_REFUSED if forbidden else EXIT_FAILED
        raise ClientExit(status, f"not marked: {refused.why}") from None
    emit(
        {
            "conversation": answer.conversation,
            "seq": answer.seq,
            "moved": answer.moved,
            "last_seq": answer.last_seq,
        }
    )
    return EXIT_OK


async def send_command(reactor: ICimReactor, client: Any, options: argparse.Namespace) -> int:
    outcome = await with_timeout(
        reactor, client.send_text(options.to, options.text), options.timeout
    )
    if outcome is None:
        emit({"status": "failed", "reason": "timeout", "to": options.to})
        raise ClientExit(EXIT_FAILED, f"no outcome in {options.timeout:g} s")
    emit(outcome_record(outcome))
    if outcome.status not in ("delivered", "stored"):
        from cim.im.direct import REASON_NOT_ACCEPTED

        # The receiver's consent (docs/privacy.md) is a permission, not a failure.
        status = EXIT_REFUSED if outcome.reason == REASON_NOT_ACCEPTED else EXIT_FAILED
        raise ClientExit(status, f"not delivered: {outcome.reason or outcome.status}")
    return EXIT_OK


async def sync_command(client: Any) -> int:
    """The catch-up summary: conversations with unread messages, newest activity first
    (count, last_seq, the device's cursor, the newest message), and the total. It takes
    nothing: no cursor moves."""
    summary = await client.offline_summary()
    emit(
        listing(
            [summary_record(entry) for entry in summary.conversations],
            total=summary.total,
            more=summary.more,
        )
    )
    return EXIT_OK


async def online_command(client: Any) -> int:
    page = await client.online(0, 1000)
    emit(listing(list(page.users), total=page.total))
    return EXIT_OK


async def devices_command(client: Any) -> int:
    """The user's devices online now, by name: when each connected, when it last did
    something other than a heartbeat, and which one is this command's."""
    answer = await client.devices()
    emit(
        listing(
            [
                {
                    "device": each.device,
                    "connected_at": iso_time(each.connected_at_ms / 1000),
                    "active_at": iso_time(each.active_at_ms / 1000),
                    "this_device": each.this_device,
                }
                for each in answer.devices
            ]
        )
    )
    return EXIT_OK


async def history_command(client: Any, options: argparse.Namespace) -> int:
    """Print up to --limit messages, newest first, asking page after page.

    Stops at the first refusal, even after printing: a script must not take a partial
    history for a whole one. Not being a participant is exit status 4 (refused, as any
    permission refusal); the node's other answers (history unavailable) are 1.
    """
    target = await resolve_group(client, options.peer) if options.group else options.peer
    before = options.before
    remaining = options.limit
    while remaining > 0:
        page = await client.history(
            target, min(remaining, HISTORY_PAGE), before, group=options.group
        )
        if page.error:
            status = EXIT_REFUSED if page.error in REFUSED_CODES else EXIT_FAILED
            raise ClientExit(
                status, f"history refused: {page.message or page.error} ({page.error})"
            )
        for message in page.messages[:remaining]:
            write_line(message_json(message))
        remaining -= len(page.messages)
        if not page.more or not page.next_before or not page.messages:
            break
        before = page.next_before
    return EXIT_OK


async def typing_command(client: Any, options: argparse.Namespace) -> int:
    """One typing notice. Refused (the receiver does not accept you, not a member of
    the group): exit status 4, as a refused message."""
    from cim.client.answers import RequestRefused

    if bool(options.to) == bool(options.group):
        raise ClientExit(EXIT_USAGE, "name the other user (TO) or --group G, one of them")
    group = await resolve_group(client, options.group) if options.group else ""
    try:
        answer = await client.typing(options.to, group, stopped=options.stopped)
    except RequestRefused as refusal:
        raise ClientExit(EXIT_REFUSED, f"typing refused: {refusal.why}") from None
    record = {
        "to": options.to or None,
        "group": group or None,
        "state": "stopped" if options.stopped else "typing",
        "status": "dropped" if answer.dropped else "sent",
    }
    emit({key: value for key, value in record.items() if value is not None})
    return EXIT_OK


class Listener:
    """``listen``: prints messages until --count, --timeout, a kick or (with
    --no-reconnect) a lost connection; a lost connection otherwise is one line on
    stderr while the library reconnects.

    First the catch-up: every conversation with unread messages, newest activity first,
    each oldest first; then live messages as they come (in seq order per conversation:
    the library fills gaps), and read notices (``"event": "read"``: the user's other
    device read, or a 1:1 peer read up to a seq). Exactly --count messages are taken:
    the cursor moves only over printed messages, and once the count is reached the
    library takes no more, so what came with them (the rest of a page, a live one)
    stays unread for the next run.
    """

    def __init__(self, reactor: ICimReactor, client: Any, options: argparse.Namespace) -> None:
        from twisted.internet.defer import Deferred

        self.reactor = reactor
        self.client = client
        self.count: int = options.count
        self.timeout: float = options.timeout
        self.reconnect = not options.no_reconnect
        self.received = 0
        self.lost = False
        self.done: Deferred[ClientExit] = Deferred()
        ticket = client.ticket
        self.node = f"node {ticket.node.node_id}" if ticket and ticket.node.node_id else "node"

    async def run(self) -> int:
        self.client.on_message = self.arrived
        self.client.on_typing = self.typing
        self.client.on_change = self.changed
        self.client.on_read = self.read
        self.client.on_state = self.state_changed
        if self.timeout:
            self.reactor.callLater(self.timeout, self.timed_out)
        ending = await self.done
        if ending.status != EXIT_OK:
            raise ending
        return EXIT_OK

    def finish(self, status: int, message: str = "") -> None:
        """Take nothing more (what is held for ordering stays on the node, so what was
        printed is what was taken) and end on the next turn: the library acknowledges
        the last printed message after ``arrived`` returns."""
        self.client.stop_receiving()
        if not self.done.called:
            self.reactor.callLater(0, self._fire, ClientExit(status, message))

    def _fire(self, ending: ClientExit) -> None:
        if not self.done.called:
            self.done.callback(ending)

    def arrived(self, message: Any) -> bool:
        return self._print(message_json(message))

    def changed(self, change: Any) -> bool:
        """A recall or edit: one line with its ``event`` ("recall", "edit"); it counts
        toward --count like a message (it is an entry of the timeline)."""
        return self._print(json.dumps(change_record(change), ensure_ascii=False))

    def _print(self, line: str) -> bool:
        try:
            write_line(line)
        except OutputClosed:
            self.finish(EXIT_OK)
            return False  # not shown to anyone: the node keeps it
        self.received += 1
        if self.count and self.received >= self.count:
            self.finish(EXIT_OK)  # after this one, which is taken
        return True

    def typing(self, notice: Any) -> None:
        """Printed as it comes, not counted: a notice is no message."""
        if self.done.called:
            return
        try:
            write_line(typing_json(notice))
        except OutputClosed:
            self.finish(EXIT_OK)

    def read(self, event: Any) -> None:
        """A read notice: one ``"event": "read"`` line (not counted in --count)."""
        if self.done.called:
            return
        try:
            write_line(json.dumps(event.json_record(), ensure_ascii=False))
        except OutputClosed:
            self.finish(EXIT_OK)

    def timed_out(self) -> None:
        if self.count:
            self.finish(
                EXIT_FAILED,
                f"timed out after {self.timeout:g} s, got {self.received} of {self.count}",
            )
        else:
            self.finish(EXIT_OK)

    def state_changed(self, state: str, detail: str) -> None:
        if state == "stopped":
            self.finish(EXIT_REFUSED, detail)
        elif state == "online":
            if self.lost:
                log.info("online again at {where}", where=detail)
            self.lost = False
        elif state in ("reconnecting", "connecting") and not self.lost:
            self.lost = True
            if not self.reconnect:
                self.finish(EXIT_CONNECTION_LOST, f"lost the connection to the {self.node}")
            else:
                sys.stderr.write(
                    f"cim-client: lost the connection to the {self.node}; reconnecting\n"
                )
                sys.stderr.flush()

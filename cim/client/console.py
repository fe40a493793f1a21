"""The interactive chat console (``cim-client --user U`` with no subcommand).

Incoming messages, delivery outcomes and connection changes print above the prompt
without disturbing what the user is typing (prompt_toolkit's patch_stdout), so one can
chat while the other side answers. The bottom toolbar always shows the connection
state, so a user typing into a dead connection knows it (the library keeps the
message and sends it after reconnecting), and who is typing to us ("alice typing…").
Typing a plain line tells the other side we are typing (one notice per 3 s at most);
``/app background`` slows the heartbeat as a phone's app would.

Everything that decides what to print is plain methods on ``Console`` taking a
``write`` function, so it is tested without a terminal; only ``run`` needs one. How
a message or a line reads is in ``console_lines``, the help text, completion and
input history in ``console_input``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.history import History
from prompt_toolkit.patch_stdout import patch_stdout
from twisted.internet.defer import Deferred

from cim.client.console_input import HELP, ChatCompleter, input_history
from cim.client.console_lines import (
    Conversation,
    body,
    clock,
    offline_summary_line,
    parse_command,
    snippet,
)
from cim.client.reads import ReadEvent, conversation_key
from cim.client.session import DeliveryOutcome
from cim.protocols import cim_pb2
from cim.reactor import ICimReactor

TYPING_SHOWN = 6.0
"""Seconds "typing…" stays without a newer notice (the sender repeats it every 3 s
while typing, so it ends by itself when a "stopped" was lost)."""
TYPING_EVERY = 3.0
"""Seconds between our own notices while the user types (the node's rate)."""

HISTORY_DEFAULT = 20
HISTORY_MOST = 1000
HISTORY_PAGE = 200
"""The most the node answers per HISTORY_R: longer histories take several pages."""


class Console:
    """One user's chat console over a running ``ChatClient``.

    ``client`` is a ChatClient (or anything with its methods, for tests); ``write``
    prints one line above the prompt.
    """

    def __init__(
        self,
        reactor: ICimReactor,
        client: Any,
        write: Callable[[str], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.client = client
        self.write: Callable[[str], None] = write or (lambda line: print(line, flush=True))
        self.conversation: Conversation | None = None
        self.known_users: set[str] = set()
        self.groups: dict[str, str] = {}  # id -> name, from group lists
        self.completer = ChatCompleter(self)
        self.state: str = client.state
        self.state_detail = ""
        self.reconnect_at: float | None = None
        self.last_failed: tuple[int, str, Conversation] | None = None
        self.last_sent: dict[Conversation, int] = {}
        """The id of the last message sent in each conversation: what /recall and /edit
        change when no id is named."""
        self._asked_groups_for: set[str] = set()
        self._app: Any = None
        self.typing: dict[tuple[str, str], float] = {}
        """(who, group) -> until when "typing…" shows for them."""
        self._typing_sent_at = float("-inf")
        client.on_message = self.message_arrived
        client.on_typing = self.typing_arrived
        client.on_change = self.change_arrived
        client.on_state = self.state_changed
        client.on_read = self.read_arrived
        client.catch_up.on_summary = self.summary_arrived

    # --- what arrives -----------------------------------------------------------------

    def format_message(self, message: cim_pb2.Message) -> str:
        sender = getattr(message, "from")
        where = ""
        if message.group:
            where = f"#{self.groups.get(message.group, message.group)} "
        elif sender == self.user and message.to:
            where = f"→ {message.to} "  # sent from another of my devices, or history
        who = sender
        if sender == self.user and message.device and message.device != self.device:
            who = f"{sender} ({message.device})"  # mine, sent from that device
        return f"[{clock(message.sent_at_ms)}] {where}{who}: {body(message)}"

    def message_arrived(self, message: cim_pb2.Message) -> None:
        sender = getattr(message, "from")
        if sender != self.user:
            self.known_users.add(sender)
        if message.group and message.group not in self.groups:
            self._learn_group_name(message.group)
        self.typing.pop((sender, message.group), None)  # the message they were typing
        self.write(self.format_message(message))

    def typing_arrived(self, notice: cim_pb2.TypingN) -> None:
        key = (getattr(notice, "from"), notice.group)
        if notice.state == cim_pb2.TYPING_STOPPED:
            self.typing.pop(key, None)
        else:
            self.typing[key] = self.reactor.seconds() + TYPING_SHOWN
        if self._app is not None:
            self._app.invalidate()

    def typing_text(self) -> str:
        """ "alice typing…, bob typing… in #team" for the notices still fresh."""
        now = self.reactor.seconds()
        for key in [key for key, until in self.typing.items() if until <= now]:
            del self.typing[key]
        parts = []
        for who, group in sorted(self.typing):
            where = f" in #{self.groups.get(group, group)}" if group else ""
            parts.append(f"{who} typing…{where}")
        return ", ".join(parts)

    def text_changed(self, text: str) -> None:
        """The user is typing a line for the conversation: say so, every 3 s at most."""
        where = self.conversation
        if where is None or not text.strip() or text.startswith("/") or self.state != "online":
            return
        now = self.reactor.seconds()
        if now - self._typing_sent_at < TYPING_EVERY:
            return
        self._typing_sent_at = now
        if where.group:
            d = self.client.typing(group=where.target)
        else:
            d = self.client.typing(where.target)
        d.addErrback(lambda failure: None)  # a notice is worth no error line

    def format_change(self, change: Any) -> str:
        """A recall or edit (cim.client.corrections.Change) as one line."""
        message = change.message
        where = ""
        if message is not None and message.group:
            where = f"#{self.groups.get(message.group, message.group)} "
        sender = getattr(message, "from") if message is not None else change.by
        if change.event == "recall":
            by = "" if change.by == sender else f" by {change.by}"
            return f"[{clock(change.at_ms)}] {where}{sender}: message recalled{by}"
        return f"[{clock(change.at_ms)}] {where}{sender}: {change.text} (edited)"

    def change_arrived(self, change: Any) -> None:
        self.write(self.format_change(change))

    def _learn_group_name(self, group_id: str) -> None:
        """An unknown group (added since the last list): list once, name later lines."""
        if group_id in self._asked_groups_for:
            return
        self._asked_groups_for.add(group_id)
        Deferred.fromCoroutine(self._quietly_list_groups())

    async def _quietly_list_groups(self) -> None:
        with contextlib.suppress(Exception):  # names only make lines nicer; ids still work
            await self.list_groups()

    @property
    def user(self) -> str:
        return str(self.client.user)

    @property
    def device(self) -> str:
        return str(getattr(self.client, "device", ""))

    def format_outcome(self, outcome: DeliveryOutcome, what: str, where: Conversation) -> str:
        if outcome.status == "delivered":
            return f"  ✓ delivered to {where}: {what}"
        if outcome.status == "stored":
            return f"  ✓ stored for {where} (offline; delivered when they log in): {what}"
        if outcome.status == "accepted":
            return f"  ✓ accepted by {where}: {what}"
        reason = outcome.reason or "no reason given"
        return f"  ✗ failed: {reason}: {what} (/retry sends it again)"

    def outcome_arrived(self, outcome: DeliveryOutcome, what: str, where: Conversation) -> None:
        if outcome.status != "failed" and outcome.msg_id:
            self.last_sent[where] = outcome.msg_id
        if outcome.status == "failed":
            self.last_failed = (outcome.client_seq, what, where)
        elif self.last_failed is not None and self.last_failed[0] == outcome.client_seq:
            self.last_failed = None
        self.write(self.format_outcome(outcome, what, where))

    def _name(self, conversation: str) -> str:
        peer, group = self.client.reads.where(conversation)
        if group:
            return f"#{self.groups.get(group, group)}"
        return peer or conversation

    def read_arrived(self, event: ReadEvent) -> None:
        """✓✓ when the other side read; another device of ours reading only changes
        the unread counts (the toolbar)."""
        if not event.own:
            self.write(f"  ✓✓ {event.reader} read up to #{event.seq}")
        if self._app is not None:
            self._app.invalidate()

    def unread_text(self) -> str:
        """Unread per conversation, most first (at most 3 in the toolbar)."""
        counts = sorted(self.client.reads.unread_counts().items(), key=lambda kv: -kv[1])
        return ", ".join(f"{self._name(key)} {count}" for key, count in counts[:3])

    def state_changed(self, state: str, detail: str) -> None:
        """A line for each change the user must know of; the toolbar shows the rest."""
        previous, self.state, self.state_detail = self.state, state, detail
        self.reconnect_at = None
        if state == "reconnecting":
            match = re.search(r"in ([0-9.]+) s", detail)
            if match:
                self.reconnect_at = self.reactor.seconds() + float(match.group(1))
            if previous == "online":
                self.write(f"* connection lost; reconnecting {detail}".rstrip())
        elif state == "online":
            self.write(f"* online again ({detail})" if detail else "* online again")
        elif state == "stopped":
            self.write(f"* stopped: {detail}; /quit to leave")
        if self._app is not None:
            self._app.invalidate()

    def status_text(self) -> str:
        """The connection state as the toolbar shows it, with a live countdown."""
        state = self.state
        if state == "reconnecting" and self.reconnect_at is not None:
            left = max(0.0, self.reconnect_at - self.reactor.seconds())
            state = f"reconnecting in {left:.0f} s"
        elif state == "stopped":
            state = f"stopped: {self.state_detail}"
        elif state == "online" and self.state_detail:
            state = f"online {self.state_detail}"
        where = f" → {self.conversation}" if self.conversation else ""
        typing = self.typing_text()
        typing = f" │ {typing}" if typing else ""
        unread = self.unread_text()
        unread = f" │ unread: {unread}" if unread else ""
        return f" {self.user}{where} │ {state}{unread}{typing} │ /help"

    def prompt_text(self) -> str:
        where = f" → {self.conversation}" if self.conversation else ""
        offline = "" if self.state == "online" else f" ({self.state})"
        return f"{self.user}{where}{offline}> "

    def summary_arrived(self, summary: cim_pb2.OfflineSummaryA) -> None:
        """What waited while we were away (the catch-up's summary, before its pull)."""
        for entry in summary.conversations:
            if entry.peer:
                self.known_users.add(entry.peer)
        if summary.total:
            line = offline_summary_line(summary, self.groups)
            self.write(f"* while you were away: {line}")

    # --- what the user types ------------------------------------------------------------

    async def command(self, line: str) -> bool:
        """Run one input line; False means leave."""
        name, argument = parse_command(line)
        if not name:
            if argument:
                self.send_here(argument)
            return True
        if name in ("/quit", "/exit"):
            return False
        handler = {
            "/help": self._help,
            "/to": self._to,
            "/group": self._group,
            "/msg": self._msg,
            "/online": self._online,
            "/devices": self._devices,
            "/groups": self._groups,
            "/history": self._history,
            "/read": self._read,
            "/unread": self._unread,
            "/retry": self._retry,
            "/app": self._app_state,
            "/recall": self._recall,
            "/edit": self._edit,
        }.get(name)
        if handler is None:
            self.write(f"* unknown command {name}; /help lists them")
            return True
        try:
            await handler(argument)
        except Exception as exc:  # not connected, connection lost mid-request, ...
            self.write(f"* {name} failed: {exc}")
        return True

    def send_here(self, text: str) -> None:
        if self.conversation is None:
            self.write("* choose someone first: /to USER or /group NAME")
            return
        self.send(self.conversation, text)

    def send(self, where: Conversation, text: str) -> None:
        if where.group:
            message = cim_pb2.Message(group=where.target, text=text)
        else:
            message = cim_pb2.Message(to=where.target, text=text)
        what = snippet(text)
        # The Deferred, not on_outcome: it fires even when the send is refused at once.
        outcome: Deferred[DeliveryOutcome] = self.client.send_message(message)
        outcome.addCallback(self.outcome_arrived, what, where)

    async def _app_state(self, argument: str) -> None:
        state = argument.strip().lower()
        if state not in ("foreground", "background"):
            self.write("* usage: /app foreground|background")
            return
        answer = await self.client.set_app_state(state)
        if answer is None:
            self.write(f"* app in the {state}; the node is told when online again")
        else:
            self.write(
                f"* app in the {state}: heartbeat every {answer.heartbeat_interval_ms / 1000:g} s"
            )

    async def _help(self, argument: str) -> None:
        self.write(HELP)

    async def _to(self, argument: str) -> None:
        if not argument or " " in argument:
            self.write("* usage: /to USER")
            return
        self.conversation = Conversation(argument, argument)
        self.known_users.add(argument)
        self.write(f"* talking to {argument}")

    async def _msg(self, argument: str) -> None:
        to, _, text = argument.partition(" ")
        if not to or not text.strip():
            self.write("* usage: /msg USER TEXT")
            return
        self.known_users.add(to)
        self.send(Conversation(to, to), text.strip())

    async def list_groups(self) -> list[cim_pb2.GroupInfo]:
        answer = await self.client.group_request(cim_pb2.GroupRequest(list=cim_pb2.ListGroups()))
        if not answer.ok:
            raise RuntimeError(f"{answer.message or answer.error}")
        self.groups = {info.id: info.name for info in answer.groups}
        return list(answer.groups)

    async def _group(self, argument: str) -> None:
        if not argument:
            self.write("* usage: /group NAME (or its id; /groups lists them)")
            return
        matches = [info for info in await self.list_groups() if argument in (info.id, info.name)]
        if not matches:
            self.write(f"* you are in no group {argument!r}; /groups lists yours")
        elif len(matches) > 1:
            ids = ", ".join(info.id for info in matches)
            self.write(f"* {len(matches)} groups are named {argument!r}; use an id: {ids}")
        else:
            info = matches[0]
            self.conversation = Conversation(info.id, info.name, group=True)
            self.write(f"* talking in #{info.name} ({info.member_count} members)")

    async def _groups(self, argument: str) -> None:
        groups = await self.list_groups()
        if not groups:
            self.write("* you are in no group")
        for info in groups:
            self.write(f"  #{info.name}  id {info.id}, {info.member_count} members")

    async def _devices(self, argument: str) -> None:
        answer = await self.client.devices()
        names = [f"{d.device}{' *' if d.this_device else ''}" for d in answer.devices]
        self.write(f"* {len(names)} devices online: {', '.join(names)}")

    async def _online(self, argument: str) -> None:
        page = await self.client.online(0, 1000)
        self.known_users.update(user for user in page.users if user != self.user)
        self.write(f"* {page.total} online: {', '.join(page.users)}")

    async def _history(self, argument: str) -> None:
        where = self.conversation
        if where is None:
            self.write("* choose a conversation first: /to USER or /group NAME")
            return
        try:
            wanted = int(argument) if argument else HISTORY_DEFAULT
        except ValueError:
            wanted = 0
        if not 1 <= wanted <= HISTORY_MOST:
            self.write(f"* usage: /history [N], N from 1 to {HISTORY_MOST}")
            return
        messages: list[cim_pb2.Message] = []
        before = 0
        while len(messages) < wanted:
            page = await self.client.history(
                where.target, min(wanted - len(messages), HISTORY_PAGE), before, group=where.group
            )
            if page.error:
                self.write(f"* history refused: {page.message or page.error}")
                return
            messages.extend(page.messages)
            if not page.more or not page.next_before or not page.messages:
                break
            before = page.next_before
        if not messages:
            self.write(f"* no history with {where}")
            return
        self.write(f"--- the last {len(messages)} messages with {where} ---")
        for message in reversed(messages[:wanted]):  # pages come newest first
            self.write(self.format_message(message))
        self.write("---")

    def _last_here(self, what: str) -> int | None:
        sent = self.last_sent.get(self.conversation) if self.conversation else None
        if sent is None:
            self.write(f"* nothing of yours to {what} here: send a message first")
        return sent

    async def _recall(self, argument: str) -> None:
        if argument:
            if not argument.isdigit():
                self.write("* usage: /recall [MSG_ID]")
                return
            msg_id: int | None = int(argument)
        else:
            msg_id = self._last_here("recall")
        if msg_id is None:
            return
        change = await self.client.recall(msg_id)
        self.write(f"* {self.format_change(change)}")

    async def _edit(self, argument: str) -> None:
        if not argument:
            self.write("* usage: /edit TEXT (replaces your last message here)")
            return
        msg_id = self._last_here("edit")
        if msg_id is None:
            return
        change = await self.client.edit(msg_id, argument)
        self.write(f"* {self.format_change(change)}")

    async def _read(self, argument: str) -> None:
        where = self.conversation
        if where is None:
            self.write("* no conversation yet: /to USER or /group NAME first")
            return
        key = conversation_key(self.user, where.target, where.group)
        if not self.client.reads.newest(key):
            self.write(f"* nothing to mark read with {where}")
            return
        answer = await self.client.mark_read(key)
        self.write(f"* {where}: read up to #{answer.seq}")

    async def _unread(self, argument: str) -> None:
        counts = self.client.reads.unread_counts()
        if not counts:
            self.write("* nothing unread")
        for key, count in sorted(counts.items(), key=lambda kv: -kv[1]):
            self.write(f"  {self._name(key)}: {count} unread")

    async def _retry(self, argument: str) -> None:
        if self.last_failed is None:
            self.write("* nothing failed to send")
            return
        client_seq, what, where = self.last_failed
        self.last_failed = None
        try:
            outcome: Deferred[DeliveryOutcome] = self.client.resend(client_seq)
        except KeyError:
            self.write(f"* {what} is too old to send again; type it again")
            return
        self.write(f"* sending {what} again")
        outcome.addCallback(self.outcome_arrived, what, where)

    # --- the terminal -----------------------------------------------------------------

    async def run(self, history: History | None = None) -> None:
        session: PromptSession[str] = PromptSession(
            completer=self.completer,
            complete_while_typing=False,
            history=history if history is not None else input_history(self.user),
            bottom_toolbar=self.status_text,
            refresh_interval=0.5,
        )
        self._app = session.app
        session.default_buffer.on_text_changed += lambda buffer: self.text_changed(buffer.text)
        self.write(f"* logged in as {self.user}; /help lists the commands")
        summary = self.client.catch_up.last_summary
        if summary is not None:  # it caught up before we were listening
            self.summary_arrived(summary)
        Deferred.fromCoroutine(self._quietly_list_groups())
        with patch_stdout():
            while True:
                try:
                    future = asyncio.ensure_future(session.prompt_async(self.prompt_text))
                    line = await Deferred.fromFuture(future)
                except KeyboardInterrupt:
                    continue  # Ctrl-C drops the line being typed; Ctrl-D leaves
                except EOFError:
                    return
                if not await self.command(line):
                    return


async def run_console(reactor: ICimReactor, client: Any) -> None:
    await Console(reactor, client).run()

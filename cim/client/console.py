"""The interactive chat console (``cim-client --user U`` with no subcommand).

Incoming messages and delivery outcomes print above the prompt without disturbing
what the user is typing (prompt_toolkit's patch_stdout), so one can chat while the
other side answers.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import WordCompleter
from prompt_toolkit.patch_stdout import patch_stdout
from twisted.internet.defer import Deferred

from cim.client.files import media_summary
from cim.client.session import ChatClient, DeliveryOutcome
from cim.protocols import cim_pb2

HELP = """commands:
  /to USER          talk to USER from now on (plain lines go to them)
  /msg USER TEXT    send one message to USER
  /online           list online users
  /help             this text
  /quit             log out and leave"""


def _clock(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%H:%M:%S")


class Console:
    def __init__(self, reactor: Any, client: ChatClient) -> None:
        self.reactor = reactor
        self.client = client
        self.peer: str | None = None
        self.known_users: set[str] = set()
        self.completer = WordCompleter(
            lambda: ["/to", "/msg", "/online", "/help", "/quit", *sorted(self.known_users)],
        )
        client.on_message = self.message_arrived
        client.on_outcome = self.outcome_arrived
        client.on_state = self.state_changed

    def message_arrived(self, message: cim_pb2.Message) -> None:
        sender = getattr(message, "from")
        self.known_users.add(sender)
        text = media_summary(message) if message.HasField("media") else message.text
        where = f"#{message.group} " if message.group else ""
        print(f"[{_clock(message.sent_at_ms)}] {where}{sender}: {text}")

    def outcome_arrived(self, outcome: DeliveryOutcome) -> None:
        detail = f" ({outcome.reason})" if outcome.reason else ""
        print(f"  -> {outcome.to}: {outcome.status}{detail}")

    def state_changed(self, state: str, detail: str) -> None:
        print(f"* {state}{' ' + detail if detail else ''}")

    async def run(self) -> None:
        session: PromptSession[str] = PromptSession(completer=self.completer)
        print(f"* logged in as {self.client.user}; /help lists the commands")
        with patch_stdout():
            while True:
                prompt = f"{self.client.user}{' -> ' + self.peer if self.peer else ''}> "
                try:
                    future = asyncio.ensure_future(session.prompt_async(prompt))
                    line = await Deferred.fromFuture(future)
                except (EOFError, KeyboardInterrupt):
                    return
                if not await self.command(line.strip()):
                    return

    async def command(self, line: str) -> bool:
        """Run one input line; False means leave."""
        if not line:
            return True
        if line in ("/quit", "/exit"):
            return False
        if line == "/help":
            print(HELP)
        elif line == "/online":
            try:
                page = await self.client.online(0, 1000)
            except Exception as exc:
                print(f"* cannot list online users: {exc}")
                return True
            self.known_users.update(page.users)
            print(f"* {page.total} online: {', '.join(page.users)}")
        elif line.startswith("/to "):
            self.peer = line[4:].strip() or None
            if self.peer:
                self.known_users.add(self.peer)
        elif line.startswith("/msg "):
            _, _, rest = line.partition(" ")
            to, _, text = rest.strip().partition(" ")
            if not to or not text:
                print("* usage: /msg USER TEXT")
            else:
                self.client.send_text(to, text)
        elif line.startswith("/"):
            print(f"* unknown command {line.split()[0]}; /help lists them")
        elif self.peer is None:
            print("* choose someone first: /to USER")
        else:
            self.client.send_text(self.peer, line)
        return True


async def run_console(reactor: Any, client: ChatClient) -> None:
    await Console(reactor, client).run()

"""What helps the user type at the chat console: the command list and its help
text, Tab completion of commands and names, and the Up/Down history kept per user.

The history file holds what the user typed, so it lives under the user's own cache
directory with owner-only permissions, and a run without a writable cache keeps it in
memory only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory

if TYPE_CHECKING:
    from cim.client.console import Console

HELP = """commands:
  /to USER          talk to USER from now on (plain lines go to them)
  /group NAME       talk in a group from now on (its name, or its id)
  /msg USER TEXT    send one message to USER, staying where you are
  /online           which of your contacts are online
  /devices          your own devices online now (this one marked *)
  /groups           list your groups
  /history [N]      the last N messages (default 20) of this conversation
  /read             mark this conversation read (your other devices and, unless
                    you turned read receipts off, the other side see it: ✓✓)
  /unread           unread messages per conversation
  /retry            send the last failed message again
  /app STATE        tell the node the app is in the foreground or the background
  /recall [MSG_ID]  recall your last message here (or the one named)
  /edit TEXT        replace the text of your last message here
  /help             this text
  /quit             log out and leave (also Ctrl-D)
Tab completes commands, user and group names; Up/Down recall earlier lines."""

COMMANDS = (
    "/to",
    "/group",
    "/msg",
    "/online",
    "/devices",
    "/groups",
    "/history",
    "/read",
    "/unread",
    "/retry",
    "/app",
    "/recall",
    "/edit",
    "/help",
    "/quit",
)


def history_path(user: str) -> str:
    """Per-user input history under the XDG cache dir (it holds what the user typed)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", user)
    return os.path.join(base, "cim", f"history-{safe}")


def input_history(user: str) -> History:
    """A file history when the cache dir is writable, else one for this run only."""
    path = history_path(user)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
        os.chmod(path, 0o600)
    except OSError:
        return InMemoryHistory()
    return FileHistory(path)


class ChatCompleter(Completer):
    """Commands first; then user names after /to and /msg, group names after /group."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        command, space, argument = text.partition(" ")
        if not space:
            for name in COMMANDS:
                if name.startswith(command.lower()):
                    yield Completion(name, -len(command))
            return
        command = command.lower()
        if command == "/group":
            names = sorted(set(self.console.groups.values()))
            for name in names:
                if name.lower().startswith(argument.lower()):
                    yield Completion(name, -len(argument))
        elif command in ("/to", "/msg") and " " not in argument:
            for user in sorted(self.console.known_users):
                if user.lower().startswith(argument.lower()):
                    yield Completion(user, -len(argument))

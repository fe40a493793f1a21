"""cim-client: script-friendly subcommands with JSON output, or a chat console.

    cim-client [--router URL] --user U [--cipher SUITE] send TO TEXT
    cim-client --user U listen [--count N] [--timeout S] [--no-reconnect]
    cim-client --user U sync
    cim-client --user U online
    cim-client --user U devices               (your devices online now)
    cim-client --user U history PEER [--group] [--limit N] [--before SEQ]
    cim-client --user U typing TO|--group G [--stopped]
    cim-client --user U recall MSG_ID | edit MSG_ID TEXT
    cim-client --user U group create|add|invite|remove|leave|list|members|send ...
    cim-client --user U group accept|decline GROUP | invitations
    cim-client --user U contacts list | request|accept|decline|remove|block|unblock USER
                                 [--for DEVICE] | policy [contacts|everyone]
                                 [--group-adds contacts|nobody] [--read-receipts on|off]
    cim-client --user U read CONVERSATION [SEQ] [--group]   (a user, a group, or a key)
    cim-client [--files URL] --user U send-file TO PATH [--group]
    cim-client [--files URL] [--user U] download URL [-o PATH|-] [--force]
    cim-client [--files URL] --user U delete-file [--] FILE_ID   (an old id may begin with '-')
    cim-client --user U                      (interactive console)

The logic service (docs/logic.md), each printing the JSON answer:

    cim-client [--logic URL] --user U register [--kind person|device]
    cim-client --user U bind code | add DEVICE CODE | list | approve DEVICE GUARDIAN
                             | del DEVICE GUARDIAN
    cim-client --user U sos raise LAT LON [--accuracy M] [--battery PCT]
                            | list [--device D] | show ID | ack ID
    cim-client --user U fence add DEVICE NAME (--circle LAT,LON,RADIUS | --polygon LAT,LON ...)
                              | list DEVICE | del DEVICE FENCE
    cim-client --user U locate report LAT LON [--accuracy M] [--at T] | list DEVICE
    cim-client --user U post add TEXT [--media-url URL] [--goal N] [--family]
                             | list [--author A] | show ID | del ID
    cim-client --user U like POST | unlike POST | likers POST

The user comes from --user or CIM_USER, the password from CIM_PASSWORD or a prompt.
Output follows one JSON convention (cim.scripts.output, docs/protocol.md). Every error
is one line on stderr and an exit status: 0 ok, 1 the operation failed, 2 usage,
3 a router, node or service could not be reached, 4 refused (login, permission),
5 ``listen --no-reconnect`` lost its connection. Logging goes to stderr: warnings and
errors only, ``-v`` adds the library's progress, ``-vv`` everything.

The commands live by concern: chat_commands (send, listen, sync, online, history, typing),
change_commands (recall, edit), group_commands, contact_commands, file_commands,
logic_commands; login says how each logs in and which status each failure gets.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any, cast

from cim.config import KNOWN_SUITES
from cim.reactor import ICimReactor
from cim.scripts.arguments import OneLineParser
from cim.scripts.change_commands import CHANGE_COMMANDS, add_change_commands, change_command
from cim.scripts.chat_commands import (
    Listener,
    add_chat_commands,
    add_read_command,
    devices_command,
    history_command,
    online_command,
    read_command,
    send_command,
    sync_command,
    typing_command,
)
from cim.scripts.contact_commands import add_contact_commands, contacts_command
from cim.scripts.file_commands import (
    FILE_SERVICE_COMMANDS,
    add_file_commands,
    send_file_command,
)
from cim.scripts.group_commands import add_group_commands, group_command, resolve_group
from cim.scripts.logic_commands import (
    LOGIC_COMMANDS,
    add_logic_commands,
    logic_call,
    logic_command,
)
from cim.scripts.login import exit_for, online_client
from cim.scripts.output import EXIT_OK, ClientExit, add_version_option
from cim.scripts.records import message_json

__all__ = [
    "DEFAULT_FILES",
    "DEFAULT_LOGIC",
    "DEFAULT_ROUTER",
    "LOGIC_COMMANDS",
    "ClientExit",
    "build_parser",
    "history_command",
    "logic_call",
    "main",
    "message_json",
    "resolve_group",
    "run",
]

DEFAULT_ROUTER = "http://127.0.0.1:8080"
DEFAULT_FILES = "http://127.0.0.1:8082"
DEFAULT_LOGIC = "http://127.0.0.1:8081"
CONNECT_TIMEOUT = 10.0
RECEIVING_COMMANDS = frozenset(("listen", None))
"""Commands that take (print, acknowledge) received messages: listen and the console.
The others, sync included (it prints counts, not messages), move no cursor."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="cim-client", description="Chat through a cim node.")
    add_version_option(parser)
    parser.add_argument(
        "--router",
        default=os.environ.get("CIM_ROUTER", DEFAULT_ROUTER),
        help=f"router base URL (default $CIM_ROUTER or {DEFAULT_ROUTER})",
    )
    parser.add_argument(
        "--files",
        default=os.environ.get("CIM_FILES", DEFAULT_FILES),
        help=f"file service base URL (default $CIM_FILES or {DEFAULT_FILES})",
    )
    parser.add_argument(
        "--logic",
        default=os.environ.get("CIM_LOGIC", DEFAULT_LOGIC),
        help=f"logic service base URL (default $CIM_LOGIC or {DEFAULT_LOGIC})",
    )
    parser.add_argument(
        "--user", default=os.environ.get("CIM_USER"), help="your user name (default $CIM_USER)"
    )
    parser.add_argument(
        "--device",
        default=os.environ.get("CIM_DEVICE"),
        help="this device's name (default $CIM_DEVICE, else cli-HOST for the console, listen "
        "and sync, cli-HOST-cmd for other commands); each device of a user has a session",
    )
    parser.add_argument(
        "--cipher", choices=KNOWN_SUITES, default=None, help="insist on one cipher suite"
    )
    parser.add_argument(
        "--transport",
        choices=("tcp", "websocket"),
        default="tcp",
        help="reach the node on its TCP port (default) or its WebSocket gateway, as a browser",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT,
        metavar="S",
        help=f"give up on an unreachable router or node after S seconds "
        f"(default {CONNECT_TIMEOUT:g}; exit status 3)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more on stderr: -v the library's progress, -vv everything",
    )
    commands = parser.add_subparsers(dest="command")
    add_chat_commands(commands)
    add_change_commands(commands)
    add_read_command(commands)
    add_group_commands(commands)
    add_contact_commands(commands)
    add_file_commands(commands)
    add_logic_commands(commands)
    return parser


async def run(reactor: ICimReactor, options: argparse.Namespace) -> int:
    if options.command in FILE_SERVICE_COMMANDS:
        return await FILE_SERVICE_COMMANDS[options.command](reactor, options)
    if options.command in LOGIC_COMMANDS:
        return await logic_command(reactor, options)
    on_state = None
    if options.command is None:
        # The console takes over once online; until then show how the login goes.
        def on_state(state: str, detail: str) -> None:
            sys.stderr.write(f"* {state}{' ' + detail if detail else ''}\n")

    receiving = options.command in RECEIVING_COMMANDS
    client = await online_client(reactor, options, receiving, on_state)
    try:
        if options.command == "send":
            return await send_command(reactor, client, options)
        if options.command == "send-file":
            return await send_file_command(reactor, client, options)
        if options.command == "group":
            return await group_command(reactor, client, options)
        if options.command == "contacts":
            return await contacts_command(client, options)
        if options.command == "history":
            return await history_command(client, options)
        if options.command in CHANGE_COMMANDS:
            return await change_command(client, options)
        if options.command == "online":
            return await online_command(client)
        if options.command == "typing":
            return await typing_command(client, options)
        if options.command == "devices":
            return await devices_command(client)
        if options.command == "sync":
            return await sync_command(client)
        if options.command == "read":
            return await read_command(client, options)
        if options.command == "listen":
            return await Listener(reactor, client, options).run()
        from cim.client.console import run_console

        await run_console(reactor, client)
        return EXIT_OK
    finally:
        await client.stop(logout=True)


def start_logging(verbosity: int) -> None:
    """The library's log events on stderr, one line each, from the chosen level up."""
    from twisted.logger import (
        FilteringLogObserver,
        ILogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        formatEvent,
        globalLogBeginner,
    )

    level = (LogLevel.warn, LogLevel.info)[verbosity] if verbosity < 2 else LogLevel.debug

    def write(event: dict[str, Any]) -> None:
        text = formatEvent(event).strip()
        failure = event.get("log_failure")
        if failure is not None:
            text += f": {failure.getErrorMessage()}"
            if verbosity:
                text += "\n" + failure.getTraceback()
        sys.stderr.write(f"cim-client: {event['log_level'].name}: {text}\n")

    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    observer = FilteringLogObserver(cast(ILogObserver, write), [predicate])
    globalLogBeginner.beginLoggingTo([observer], discardBuffer=True, redirectStandardIO=False)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    options = parser.parse_args(argv)
    if not options.user:
        parser.error("--user is required (or set CIM_USER)")
    start_logging(options.verbose)
    from twisted.internet import asyncioreactor

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    asyncioreactor.install(loop)
    from twisted.internet.defer import ensureDeferred

    from cim.reactor import installed_reactor

    reactor = installed_reactor()

    status = {"code": EXIT_OK}

    def finished(code: int) -> None:
        status["code"] = code

    def failed(failure: Any) -> None:
        ending = exit_for(failure.value)
        if ending.message:
            sys.stderr.write(f"cim-client: {ending.message}\n")
        if options.verbose > 1:
            sys.stderr.write(failure.getTraceback())
        status["code"] = ending.status

    def go() -> None:
        d = ensureDeferred(run(reactor, options))
        d.addCallbacks(finished, failed)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    sys.exit(status["code"])


if __name__ == "__main__":
    main()

"""cim-client: script-friendly subcommands with JSON-lines output, or a chat console.

    cim-client [--router URL] --user U [--cipher SUITE] send TO TEXT
    cim-client --user U listen [--count N] [--timeout S]
    cim-client --user U online
    cim-client --user U history PEER [--group] [--limit N] [--before ID]
    cim-client [--files URL] --user U send-file TO PATH [--group]
    cim-client [--files URL] [--user U] download URL [-o PATH]
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

The password comes from CIM_PASSWORD or a prompt. Exit status: 0 on success, 1 when
the operation failed (message failed, router refused, timeout), 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import getpass
import json
import math
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from cim.config import KNOWN_SUITES

DEFAULT_ROUTER = "http://127.0.0.1:8080"
DEFAULT_FILES = "http://127.0.0.1:8082"
DEFAULT_LOGIC = "http://127.0.0.1:8081"


class ClientExit(Exception):
    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cim-client", description="Chat through a cim node.")
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
    parser.add_argument("--user", default=os.environ.get("CIM_USER"), help="your user name")
    parser.add_argument(
        "--device", default=f"cli-{socket.gethostname()}"[:64], help="this device's name"
    )
    parser.add_argument(
        "--cipher", choices=KNOWN_SUITES, default=None, help="insist on one cipher suite"
    )
    commands = parser.add_subparsers(dest="command")
    send = commands.add_parser("send", help="send a text and wait for its outcome")
    send.add_argument("to")
    send.add_argument("text")
    send.add_argument(
        "--timeout",
        type=float,
        default=200.0,
        help="seconds to wait for the outcome (the library retries for up to 160 s)",
    )
    listen = commands.add_parser("listen", help="print received messages as JSON lines")
    listen.add_argument("--count", type=int, default=0, help="exit after N messages")
    listen.add_argument("--timeout", type=float, default=0.0, help="give up after S seconds")
    commands.add_parser("online", help="list online users as JSON")
    history = commands.add_parser(
        "history", help="print a conversation's archived messages as JSON lines, newest first"
    )
    history.add_argument("peer", help="the other user (or the group, with --group)")
    history.add_argument("--group", action="store_true", help="PEER names a group (id or name)")
    history.add_argument(
        "--limit", type=_positive, default=50, help="messages to print (default 50)"
    )
    history.add_argument(
        "--before",
        type=_message_id,
        default=0,
        help="only messages older than this msg_id (the last one printed, to go on)",
    )
    send_file = commands.add_parser(
        "send-file", help="upload a file (resuming an interrupted upload) and send it"
    )
    send_file.add_argument("to", help="the receiving user (or group, with --group)")
    send_file.add_argument("path")
    send_file.add_argument("--group", action="store_true", help="TO names a group")
    send_file.add_argument("--name", help="the name receivers see (default: the file's)")
    send_file.add_argument("--mime", help="the MIME type (default: guessed from the name)")
    send_file.add_argument(
        "--duration", type=float, default=None, help="voice: length in seconds (WAV: measured)"
    )
    send_file.add_argument(
        "--parallel", type=int, default=4, help="chunks in flight at once (default 4)"
    )
    send_file.add_argument(
        "--limit-rate", default="0", help="average upload rate, e.g. 500KiB or 2MiB (per second)"
    )
    send_file.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for ack:N")
    group = commands.add_parser("group", help="create, change, list and post to groups")
    group_commands = group.add_subparsers(dest="group_command", required=True)
    create = group_commands.add_parser("create", help="create a group (you own it)")
    create.add_argument("name")
    create.add_argument("members", nargs="*")
    for verb, text in (("add", "add members"), ("remove", "remove members")):
        change = group_commands.add_parser(verb, help=text)
        change.add_argument("group", help="the group's id, or its name if unambiguous")
        change.add_argument("users", nargs="+")
    leave = group_commands.add_parser("leave", help="leave a group")
    leave.add_argument("group")
    group_commands.add_parser("list", help="the groups you are in")
    members = group_commands.add_parser("members", help="a group's members")
    members.add_argument("group")
    group_send = group_commands.add_parser("send", help="post a text to a group")
    group_send.add_argument("group")
    group_send.add_argument("text")
    group_send.add_argument("--timeout", type=float, default=200.0)
    download = commands.add_parser("download", help="download a file from a message's URL")
    download.add_argument("url")
    download.add_argument("-o", "--output", help="file or directory to save to")
    add_logic_commands(commands)
    return parser


def _positive(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _message_id(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a msg_id, not {raw!r}") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError("not a msg_id")
    return value


def message_json(message: Any) -> str:
    """One received message as the JSON object `listen` prints."""
    from google.protobuf.json_format import MessageToDict

    from cim.protocols import cim_pb2

    sent_at = datetime.datetime.fromtimestamp(message.sent_at_ms / 1000, datetime.UTC)
    record: dict[str, Any] = {
        "msg_id": str(message.id),
        "from": getattr(message, "from"),
        "to": message.to,
        "type": cim_pb2.MessageType.Name(message.type).lower(),
        "text": message.text,
        "sent_at": sent_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "device": message.device,
    }
    if message.group:
        record["group"] = message.group
    if message.HasField("media"):
        record["media"] = MessageToDict(message.media, preserving_proto_field_name=True)
    if message.HasField("location"):
        record["location"] = MessageToDict(message.location, preserving_proto_field_name=True)
    return json.dumps(record, ensure_ascii=False)


def _password() -> str:
    password = os.environ.get("CIM_PASSWORD")
    if password is not None:
        return password
    if not sys.stdin.isatty():
        raise ClientExit(2, "set CIM_PASSWORD or run in a terminal to be asked for the password")
    return getpass.getpass("password: ")


def _print(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def run(reactor: Any, options: argparse.Namespace) -> int:
    from twisted.internet.defer import Deferred

    from cim.client.session import ChatClient, SessionFailed

    if options.command == "download":
        return await _download(reactor, options)
    if options.command in LOGIC_COMMANDS:
        return await logic_command(reactor, options)

    client = ChatClient(
        reactor, options.router, options.user, _password(), options.device, options.cipher
    )
    if options.command is None:
        # The console takes over once online; until then show how the login goes.
        def show_state(state: str, detail: str) -> None:
            sys.stderr.write(f"* {state}{' ' + detail if detail else ''}\n")

        client.on_state = show_state
    try:
        await client.start()
    except SessionFailed as failure:
        raise ClientExit(1, str(failure)) from None
    try:
        if options.command == "send":
            outcome = await _with_timeout(
                reactor, client.send_text(options.to, options.text), options.timeout
            )
            if outcome is None:
                _print(json.dumps({"msg_id": None, "status": "failed", "reason": "timeout"}))
                return 1
            _print(json.dumps(_outcome_line(outcome)))
            return 0 if outcome.status in ("delivered", "stored") else 1
        if options.command == "send-file":
            return await _send_file(reactor, client, options)
        if options.command == "group":
            return await _group(reactor, client, options)
        if options.command == "history":
            return await history_command(client, options)
        if options.command == "online":
            page = await client.online(0, 1000)
            _print(json.dumps({"total": page.total, "users": list(page.users)}))
            return 0
        if options.command == "listen":
            done: Deferred[bool] = Deferred()
            received = 0

            def arrived(message: Any) -> None:
                nonlocal received
                _print(message_json(message))
                received += 1
                if options.count and received >= options.count and not done.called:
                    # Next turn: the library acknowledges the message after this returns.
                    reactor.callLater(0, finish)

            def finish() -> None:
                if not done.called:
                    done.callback(True)

            client.on_message = arrived
            finished = await _with_timeout(reactor, done, options.timeout or None)
            if finished is None and options.count:
                raise ClientExit(1, f"timed out after {received} of {options.count} messages")
            return 0
        from cim.client.console import run_console

        await run_console(reactor, client)
        return 0
    finally:
        await client.stop(logout=True)


def _outcome_line(outcome: Any) -> dict[str, Any]:
    result = {"msg_id": str(outcome.msg_id), "status": outcome.status, "to": outcome.to}
    if outcome.reason:
        result["reason"] = outcome.reason
    return result


def _group_json(info: Any) -> dict[str, Any]:
    return {
        "id": info.id,
        "name": info.name,
        "owner": info.owner,
        "admins": list(info.admins),
        "member_count": info.member_count,
    }


async def resolve_group(client: Any, reference: str) -> str:
    """A group id from an id or a name the user has exactly one group of."""
    from cim.protocols import cim_pb2

    answer = await client.group_request(cim_pb2.GroupRequest(list=cim_pb2.ListGroups()))
    if not answer.ok:
        raise ClientExit(1, f"cannot list your groups: {answer.message}")
    matches = [g.id for g in answer.groups if reference in (g.id, g.name)]
    if len(matches) == 1:
        return str(matches[0])
    if not matches:
        raise ClientExit(1, f"you are in no group {reference!r}")
    raise ClientExit(1, f"you are in {len(matches)} groups named {reference!r}: use an id")


async def _group(reactor: Any, client: Any, options: argparse.Namespace) -> int:
    from cim.protocols import cim_pb2

    verb = options.group_command
    if verb == "send":
        group_id = await resolve_group(client, options.group)
        outcome = await _with_timeout(
            reactor, client.send_group(group_id, options.text), options.timeout
        )
        if outcome is None:
            _print(json.dumps({"msg_id": None, "status": "failed", "reason": "timeout"}))
            return 1
        _print(json.dumps(_outcome_line(outcome) | {"group": group_id}))
        return 0 if outcome.status == "accepted" else 1
    requests = {
        "create": lambda: cim_pb2.GroupRequest(
            create=cim_pb2.CreateGroup(name=options.name, members=options.members)
        ),
        "add": lambda: cim_pb2.GroupRequest(
            add=cim_pb2.ChangeMembers(group=options.group, users=options.users)
        ),
        "remove": lambda: cim_pb2.GroupRequest(
            remove=cim_pb2.ChangeMembers(group=options.group, users=options.users)
        ),
        "leave": lambda: cim_pb2.GroupRequest(leave=cim_pb2.GroupRef(group=options.group)),
        "list": lambda: cim_pb2.GroupRequest(list=cim_pb2.ListGroups()),
        "members": lambda: cim_pb2.GroupRequest(members=cim_pb2.GroupRef(group=options.group)),
    }
    answer = await client.group_request(requests[verb]())
    if not answer.ok:
        raise ClientExit(1, f"{answer.message} ({answer.error})")
    if verb == "list":
        _print(json.dumps([_group_json(info) for info in answer.groups]))
    elif verb == "members":
        _print(json.dumps([{"user": m.user, "role": m.role} for m in answer.members]))
    elif answer.HasField("group"):
        _print(json.dumps(_group_json(answer.group)))
    else:
        _print(json.dumps({"ok": True}))
    return 0


HISTORY_PAGE = 200
"""The most the node answers per HISTORY_R."""


async def history_command(client: Any, options: argparse.Namespace) -> int:
    """Print up to --limit messages, newest first, asking page after page.

    Stops at the first refusal with exit status 1, even after printing: a script must
    not take a partial history for a whole one.
    """
    target = await resolve_group(client, options.peer) if options.group else options.peer
    before = options.before
    remaining = options.limit
    while remaining > 0:
        page = await client.history(
            target, min(remaining, HISTORY_PAGE), before, group=options.group
        )
        if page.error:
            raise ClientExit(1, f"history refused: {page.message or page.error} ({page.error})")
        for message in page.messages[:remaining]:
            _print(message_json(message))
        remaining -= len(page.messages)
        if not page.more or not page.next_before or not page.messages:
            break
        before = page.next_before
    return 0


class _ProgressBar:
    """A tqdm bar on stderr; tqdm leaves it out when stderr is not a terminal."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._bar: Any = None

    def begin(self, total: int, done: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            initial=done,
            desc=self._label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            disable=None,
            leave=False,
        )

    def advance(self, count: int) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


async def _send_file(reactor: Any, client: Any, options: argparse.Namespace) -> int:
    from cim.client.files import (
        FileClient,
        FileServiceError,
        UploadState,
        media_message,
        voice_duration_ms,
    )
    from cim.config import parse_size

    path = options.path
    if not os.path.isfile(path):
        raise ClientExit(2, f"{path}: not a readable file")
    try:
        rate = parse_size(options.limit_rate)
    except ValueError as exc:
        raise ClientExit(2, f"--limit-rate: {exc}") from None
    assert client.ticket is not None
    files = FileClient(
        reactor,
        options.files,
        client.ticket.token,
        user=options.user,
        parallel=options.parallel,
        rate_limit=float(rate),
    )
    name = options.name or os.path.basename(path)
    try:
        report = await files.upload(
            path,
            name=name,
            mime=options.mime,
            state=UploadState(),
            progress=_ProgressBar(name),
        )
    except FileServiceError as error:
        hint = "; run the same command again to resume" if error.status in (0, 507) else ""
        raise ClientExit(1, f"upload failed: {error}{hint}") from None
    finally:
        await files.close()
    stored = report.file
    duration_ms = 0
    if options.duration is not None:
        duration_ms = int(options.duration * 1000)
    elif stored.mime.startswith("audio/"):
        duration_ms = voice_duration_ms(path)
    target = await resolve_group(client, options.to) if options.group else options.to
    message = media_message(target, stored, name, options.group, duration_ms)
    result: dict[str, Any] = {
        "file_id": stored.file_id,
        "url": stored.url,
        "thumbnail_url": stored.thumbnail_url,
        "size": stored.size,
        "mime": stored.mime,
        "instant": report.instant,
        "resumed": report.resumed,
        "chunks_sent": report.chunks_sent,
        "chunk_count": report.chunk_count,
    }
    outcome = await _with_timeout(reactor, client.send_message(message), options.timeout)
    if outcome is None:
        result.update(msg_id=None, status="failed", reason="timeout")
        _print(json.dumps(result))
        return 1
    result.update(msg_id=str(outcome.msg_id), status=outcome.status)
    if outcome.reason:
        result["reason"] = outcome.reason
    _print(json.dumps(result))
    return 0 if outcome.status in ("delivered", "stored", "accepted") else 1


async def _download(reactor: Any, options: argparse.Namespace) -> int:
    """A signed URL needs no login; any other file URL is fetched with a token."""
    import urllib.parse

    from cim.client.files import FileClient, FileServiceError
    from cim.client.router import RouterClient, RouterError

    signed = "sig=" in urllib.parse.urlsplit(options.url).query
    router = None
    token = None
    if not signed:
        if not options.user:
            raise ClientExit(2, "this URL is not signed: give --user to download it with a login")
        router = RouterClient(reactor, options.router)
        try:
            ticket = await router.login(options.user, _password(), options.device)
        except RouterError as error:
            raise ClientExit(1, str(error)) from None
        token = ticket.token
    files = FileClient(reactor, options.files, token, user=options.user or "")
    try:
        path, size = await files.download(options.url, options.output, _ProgressBar("download"))
    except FileServiceError as error:
        raise ClientExit(1, f"download failed: {error}") from None
    except OSError as error:
        raise ClientExit(1, f"cannot write the file: {error}") from None
    finally:
        await files.close()
        if router is not None and token is not None:
            with contextlib.suppress(RouterError):
                await router.logout(token)
    _print(json.dumps({"path": path, "size": size}))
    return 0


# --- the logic service ------------------------------------------------------------------

LOGIC_COMMANDS = frozenset(
    ("register", "bind", "sos", "fence", "locate", "post", "like", "unlike", "likers")
)


def add_logic_commands(commands: Any) -> None:
    """Subcommands for the logic service's calls, one verb per call (docs/logic.md)."""
    register = commands.add_parser("register", help="create the --user account (logic service)")
    register.add_argument("--kind", choices=("person", "device"), default="person")
    register.add_argument("--display-name", help="the name others see")

    bind = commands.add_parser("bind", help="bind devices to their guardians")
    bind_verbs = bind.add_subparsers(dest="verb", required=True)
    bind_verbs.add_parser("code", help="(device) a binding code to give a guardian")
    add = bind_verbs.add_parser("add", help="(guardian) bind a device with its code")
    add.add_argument("of_device", metavar="DEVICE")
    add.add_argument("code")
    bind_verbs.add_parser("list", help="your bindings, and requests waiting for you")
    for verb, text in (
        ("approve", "(first guardian) approve a pending request"),
        ("del", "remove a binding or decline a request"),
    ):
        change = bind_verbs.add_parser(verb, help=text)
        change.add_argument("of_device", metavar="DEVICE")
        change.add_argument("guardian")

    sos = commands.add_parser("sos", help="raise, list and acknowledge SOS alarms")
    sos_verbs = sos.add_subparsers(dest="verb", required=True)
    raise_sos = sos_verbs.add_parser("raise", help="(device) raise an alarm where you are")
    _position_arguments(raise_sos)
    raise_sos.add_argument("--battery", type=_battery, help="battery percentage, 0-100")
    sos_list = sos_verbs.add_parser("list", help="recent alarms")
    sos_list.add_argument("--device", dest="of_device", help="one device's (default: yours)")
    sos_list.add_argument("--limit", type=_positive)
    for verb, text in (("show", "one alarm"), ("ack", "(guardian) acknowledge an alarm")):
        one = sos_verbs.add_parser(verb, help=text)
        one.add_argument("id", type=_record_id)

    fence = commands.add_parser("fence", help="a device's geofences")
    fence_verbs = fence.add_subparsers(dest="verb", required=True)
    fence_add = fence_verbs.add_parser("add", help="(guardian) add a circle or polygon fence")
    fence_add.add_argument("of_device", metavar="DEVICE")
    fence_add.add_argument("name")
    shape = fence_add.add_mutually_exclusive_group(required=True)
    shape.add_argument("--circle", type=_circle, metavar="LAT,LON,RADIUS_M")
    shape.add_argument("--polygon", type=_point, nargs="+", metavar="LAT,LON")
    fence_list = fence_verbs.add_parser("list", help="a device's fences")
    fence_list.add_argument("of_device", metavar="DEVICE")
    fence_del = fence_verbs.add_parser("del", help="(guardian) delete a fence")
    fence_del.add_argument("of_device", metavar="DEVICE")
    fence_del.add_argument("fence", type=_record_id)

    locate = commands.add_parser("locate", help="report or read positions")
    locate_verbs = locate.add_subparsers(dest="verb", required=True)
    report = locate_verbs.add_parser("report", help="(device) report where you are")
    _position_arguments(report)
    report.add_argument("--at", type=_timestamp, help="the fix's time, epoch seconds")
    history = locate_verbs.add_parser("list", help="a device's recent positions")
    history.add_argument("of_device", metavar="DEVICE")
    history.add_argument("--since", type=_timestamp)
    history.add_argument("--until", type=_timestamp)
    history.add_argument("--limit", type=_positive)

    post = commands.add_parser("post", help="publish, list, read and delete posts")
    post_verbs = post.add_subparsers(dest="verb", required=True)
    post_add = post_verbs.add_parser("add", help="publish a post")
    post_add.add_argument("text")
    post_add.add_argument("--media-url", help="an http(s) URL, e.g. from send-file")
    post_add.add_argument("--goal", type=_positive, help="likes to collect (you are told once)")
    post_add.add_argument(
        "--family", action="store_true", help="only for the accounts bound to you"
    )
    post_list = post_verbs.add_parser("list", help="posts you can see, newest first")
    post_list.add_argument("--author")
    post_list.add_argument("--before", type=_record_id, help="older than this post id")
    post_list.add_argument("--limit", type=_positive)
    for verb, text in (("show", "one post"), ("del", "delete one of your posts")):
        one = post_verbs.add_parser(verb, help=text)
        one.add_argument("id", type=_record_id)

    for verb, text in (("like", "like a post"), ("unlike", "withdraw your like")):
        commands.add_parser(verb, help=text).add_argument("post", type=_record_id)
    likers = commands.add_parser("likers", help="how many liked a post, and who")
    likers.add_argument("post", type=_record_id)
    likers.add_argument("--limit", type=_positive)
    likers.add_argument("--offset", type=_offset)


def _position_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lat", type=_latitude)
    parser.add_argument("lon", type=_longitude)
    parser.add_argument("--accuracy", type=_metres, help="metres")


def _finite(raw: str, what: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, not {raw!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, not {raw!r}")
    return value


def _bounded(raw: str, what: str, low: float, high: float) -> float:
    value = _finite(raw, what)
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{what} must be between {low:g} and {high:g}")
    return value


def _latitude(raw: str) -> float:
    return _bounded(raw, "a latitude", -90, 90)


def _longitude(raw: str) -> float:
    return _bounded(raw, "a longitude", -180, 180)


def _metres(raw: str) -> float:
    return _bounded(raw, "a distance in metres", 0, 1e7)


def _timestamp(raw: str) -> float:
    return _bounded(raw, "epoch seconds", 0, 1e11)


def _whole(raw: str, what: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, not {raw!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{what} must be between {low} and {high}")
    return value


def _battery(raw: str) -> int:
    return _whole(raw, "a percentage", 0, 100)


def _record_id(raw: str) -> int:
    return _whole(raw, "an id", 1, 2**63 - 1)


def _offset(raw: str) -> int:
    return _whole(raw, "an offset", 0, 1_000_000)


def _point(raw: str) -> tuple[float, float]:
    parts = raw.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected LAT,LON, not {raw!r}")
    return _latitude(parts[0]), _longitude(parts[1])


def _circle(raw: str) -> tuple[float, float, float]:
    parts = raw.split(",")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected LAT,LON,RADIUS_M, not {raw!r}")
    return _latitude(parts[0]), _longitude(parts[1]), _metres(parts[2])


async def logic_call(api: Any, options: argparse.Namespace) -> Any:
    """Make the subcommand's call on a ``LogicClient``; returns what to print."""
    command, verb = options.command, getattr(options, "verb", None)
    if command == "register":
        return await api.register(options.user, _password(), options.kind, options.display_name)
    if command == "bind":
        if verb == "code":
            return await api.binding_code()
        if verb == "add":
            return await api.bind(options.of_device, options.code)
        if verb == "list":
            return {"bindings": await api.bindings()}
        if verb == "approve":
            return await api.approve_binding(options.of_device, options.guardian)
        return await api.unbind(options.of_device, options.guardian)
    if command == "sos":
        if verb == "raise":
            return await api.raise_sos(options.lat, options.lon, options.accuracy, options.battery)
        if verb == "list":
            return {"events": await api.sos_events(options.of_device, options.limit)}
        if verb == "show":
            return await api.sos_event(options.id)
        return await api.acknowledge_sos(options.id)
    if command == "fence":
        if verb == "add":
            if options.circle is not None:
                lat, lon, radius = options.circle
                return await api.add_circle_fence(options.of_device, options.name, lat, lon, radius)
            return await api.add_polygon_fence(options.of_device, options.name, options.polygon)
        if verb == "list":
            return {"fences": await api.fences(options.of_device)}
        return await api.delete_fence(options.of_device, options.fence)
    if command == "locate":
        if verb == "report":
            position = {
                "lat": options.lat,
                "lon": options.lon,
                "accuracy_m": options.accuracy,
                "at": options.at,
            }
            return await api.report_positions([position])
        positions = await api.positions(
            options.of_device, options.since, options.until, options.limit
        )
        return {"positions": positions}
    if command == "post":
        if verb == "add":
            audience = "family" if options.family else None
            return await api.create_post(options.text, options.media_url, options.goal, audience)
        if verb == "list":
            return {"posts": await api.posts(options.author, options.before, options.limit)}
        if verb == "show":
            return await api.post(options.id)
        return await api.delete_post(options.id)
    if command == "like":
        return await api.like(options.post)
    if command == "unlike":
        return await api.unlike(options.post)
    if command == "likers":
        return await api.likers(options.post, options.limit, options.offset)
    raise ClientExit(2, f"unknown command {command!r}")


async def logic_command(reactor: Any, options: argparse.Namespace) -> int:
    """Log in through the router (except to register), make the call, print the answer.

    The login is a session like any other: with one session per user, it ends a
    ``listen`` of the same user running elsewhere (notices wait for its next login).
    """
    from cim.client.logic import LogicClient, LogicError
    from cim.client.router import RouterClient, RouterError

    router = None
    token = None
    if options.command != "register":
        router = RouterClient(reactor, options.router)
        try:
            ticket = await router.login(options.user, _password(), options.device)
        except RouterError as error:
            raise ClientExit(1, str(error)) from None
        token = ticket.token
    api = LogicClient(reactor, options.logic, token)
    try:
        answer = await logic_call(api, options)
    except LogicError as error:
        raise ClientExit(1, str(error)) from None
    finally:
        await api.close()
        if router is not None and token is not None:
            with contextlib.suppress(RouterError):
                await router.logout(token)
    _print(json.dumps(answer, ensure_ascii=False))
    return 0


async def _with_timeout(reactor: Any, d: Any, timeout: float | None) -> Any:
    """The result, or None if the timeout passed first (the Deferred is cancelled)."""
    from twisted.internet.defer import CancelledError
    from twisted.internet.error import TimeoutError as DeadlinePassed

    if timeout:
        d.addTimeout(timeout, reactor)
    try:
        return await d
    except (CancelledError, DeadlinePassed):
        return None


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    options = parser.parse_args(argv)
    if not options.user and options.command != "download":
        parser.error("--user is required (or set CIM_USER)")
    from twisted.internet import asyncioreactor

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    asyncioreactor.install(loop)
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    status = {"code": 0}

    def finished(code: int) -> None:
        status["code"] = code

    def failed(failure: Any) -> None:
        error = failure.value
        if isinstance(error, ClientExit):
            if error.message:
                sys.stderr.write(f"cim-client: {error.message}\n")
            status["code"] = error.status
        else:
            sys.stderr.write(f"cim-client: {error}\n")
            status["code"] = 1

    def go() -> None:
        d = ensureDeferred(run(reactor, options))
        d.addCallbacks(finished, failed)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    sys.exit(status["code"])


if __name__ == "__main__":
    main()

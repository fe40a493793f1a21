"""cimctl: the operator's command line for a cim node.

A short-lived process, so it blocks freely: it opens the database the way the daemon
does (SQLite is created and migrated, PostgreSQL must be at the code's revision) and
runs the same account rules and transactions inline.

Every expected problem ends in one line on stderr and an exit status, never a
traceback: 0 done, 1 refused (the user exists, no such user, a weak password, the
database is behind), 2 usage or configuration errors, 3 the running router (``online``,
``kick``) could not be reached. ``online`` and ``kick`` send an operator's admin token
from ``[admin] token_file`` (``keygen --admin`` writes one; ``--operator`` picks one).
``--json`` output follows the same convention as cim-client's (cim.scripts.output):
one object, lists under ``items``, ISO 8601 times.

To add a subcommand, write ``def name(invocation: Invocation) -> int`` (and, if it
takes arguments, a function adding them to its parser), then add a ``Subcommand`` row
to ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from getpass import getpass
from typing import Any, TextIO

from sqlalchemy.exc import SQLAlchemyError

from cim.accounts.store import (
    InvalidUserKind,
    InvalidUserName,
    NoSuchUser,
    UserExists,
    WeakPassword,
    check_new_user_name,
    check_user_kind,
    check_user_name,
)
from cim.config import CimConfig, ConfigError
from cim.json_convention import iso_time, listing
from cim.scripts.invocation import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    LOCAL_CONFIG,
    SYSTEM_CONFIG,
    CommandFailed,
    Invocation,
    default_config_path,
    json_argument,
    shown_url,
)
from cim.scripts.limit_commands import limits, limits_arguments
from cim.scripts.node_commands import (
    group_list,
    group_show,
    group_show_arguments,
    keygen,
    keygen_arguments,
)
from cim.scripts.output import add_version_option
from cim.scripts.push_commands import push_show, push_show_arguments
from cim.storage.database import DatabaseRevisionError, upgrade
from cim.storage.schema import USER_KINDS

__all__ = [
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "LOCAL_CONFIG",
    "SYSTEM_CONFIG",
    "CommandFailed",
    "Invocation",
    "default_config_path",
    "main",
]


def read_new_password(invocation: Invocation, name: str) -> str:
    """From stdin's first line when it is not a terminal (scripts), else asked twice."""
    if not invocation.stdin.isatty():
        line = invocation.stdin.readline()
        if not line:
            raise CommandFailed("no password: expected it on the first line of stdin", EXIT_USAGE)
        return line.removesuffix("\n").removesuffix("\r")
    try:
        first = getpass(f"New password for {name}: ")
        second = getpass(f"Repeat the password for {name}: ")
    except EOFError:
        raise CommandFailed("no password given", EXIT_USAGE) from None
    if not hmac.compare_digest(first.encode("utf-8"), second.encode("utf-8")):
        raise CommandFailed("the two passwords do not match")
    return first


# --- subcommands ----------------------------------------------------------------------


def check_config(invocation: Invocation) -> int:
    config = invocation.config  # loading is the check; main reports a ConfigError
    invocation.say(f"config ok: {config.path}")
    return EXIT_OK


def db_upgrade(invocation: Invocation) -> int:
    url = invocation.config.database_url
    before, after = upgrade(url)
    if before == after:
        invocation.say(f"database {shown_url(url)}: already at revision {after}")
    else:
        invocation.say(
            f"database {shown_url(url)}: upgraded from revision {before or 'none'} to {after}"
        )
    return EXIT_OK


def _user_name_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="1-64 letters, digits, '.', '_' or '-'")


def _user_add_arguments(parser: argparse.ArgumentParser) -> None:
    _user_name_argument(parser)
    parser.add_argument("--kind", choices=USER_KINDS, default="person")


def user_add(invocation: Invocation) -> int:
    name, kind = invocation.args.name, invocation.args.kind
    check_new_user_name(name, invocation.config.accounts)
    check_user_kind(kind)
    with invocation.accounts() as accounts:
        if accounts.exists(name):  # before asking for a password that would be wasted
            raise UserExists(name)
        accounts.add_user(name, read_new_password(invocation, name), kind)
    invocation.say(f"added user {name} ({kind})")
    invocation.record("user.add", name)
    return EXIT_OK


def user_passwd(invocation: Invocation) -> int:
    name = invocation.args.name
    check_user_name(name)
    with invocation.accounts() as accounts:
        if not accounts.exists(name):
            raise NoSuchUser(name)
        accounts.set_password(name, read_new_password(invocation, name))
    invocation.say(f"changed the password of {name}")
    invocation.record("user.passwd", name)
    return EXIT_OK


def user_del(invocation: Invocation) -> int:
    name = invocation.args.name
    check_user_name(name)
    with invocation.accounts() as accounts:
        if not accounts.delete_user(name):
            raise NoSuchUser(name)
    invocation.say(f"deleted user {name}")
    invocation.record("user.del", name)
    return EXIT_OK


def _user_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true", help='JSON: {"items": [{name, kind, created_at}]}'
    )


def user_list(invocation: Invocation) -> int:
    with invocation.accounts() as accounts:
        records = accounts.list_users()
    if invocation.args.json:
        rows = [
            {"name": r.name, "kind": r.kind, "created_at": iso_time(r.created_at)} for r in records
        ]
        invocation.say_json(listing(rows))
    else:
        for record in records:
            invocation.say(record.name)
    return EXIT_OK


def router_base_url(config: CimConfig) -> str:
    """Where this config's router answers, as seen from this machine."""
    parts = config.router.listen.split(":")
    if parts[0] not in ("tcp", "ssl") or len(parts) < 2:
        raise CommandFailed(
            f"[router] listen = {config.router.listen!r}: only tcp/ssl routers can be asked",
            EXIT_USAGE,
        )
    options = dict(part.split("=", 1) for part in parts[2:] if "=" in part)
    host = options.get("interface", "127.0.0.1")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if parts[0] == "ssl" else "http"
    return f"{scheme}://{host}:{parts[1]}"


def _online_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--limit", type=int, default=1000, help="users to list (max 1000)")
    parser.add_argument("--offset", type=int, default=0, help="skip this many users")


def ask_router(
    invocation: Invocation, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """GET path (POST body as JSON when given) on the running router, as the operator
    whose admin token ``[admin] token_file`` holds; its JSON reply."""
    url = f"{router_base_url(invocation.config)}{path}"
    _, token = invocation.admin_token()
    headers = {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url, headers=headers)
    if body is not None:
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            headers={**headers, "Content-Type": "application/json"},
            method="POST",
        )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            reply: dict[str, Any] = json.loads(response.read())
            return reply
    except urllib.error.HTTPError as error:
        try:
            message = json.loads(error.read()).get("message", error.reason)
        except ValueError:
            message = error.reason
        raise CommandFailed(f"the router refused: {message} (HTTP {error.code})") from None
    except OSError as error:
        reason = getattr(error, "reason", error)  # URLError wraps the socket's error
        raise CommandFailed(
            f"cannot reach the router at {url}: {reason}", EXIT_UNREACHABLE
        ) from None


def online(invocation: Invocation) -> int:
    """Ask the running router (it sees the whole cluster's state) who is online."""
    args = invocation.args
    page = ask_router(invocation, f"/api/v1/online?offset={args.offset}&limit={args.limit}")
    if args.json:
        invocation.say_json(page)  # the router's answer: already {"items": [...], ...}
        return EXIT_OK
    invocation.say(f"{page['total']} online")
    for node, count in page["nodes"].items():
        invocation.say(f"  {node}: {count}")
    devices = page.get("devices", {})
    for user in page["items"]:
        on = devices.get(user, [])
        invocation.say(f"{user}  ({', '.join(on)})" if on else user)
    return EXIT_OK


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _kick_arguments(parser: argparse.ArgumentParser) -> None:
    _user_name_argument(parser)
    parser.add_argument(
        "--device", default="", help="end only this device's session (default: every device's)"
    )
    json_argument(parser)


def kick(invocation: Invocation) -> int:
    """End a user's sessions (every device's, or ``--device``'s) through the router;
    the clients are told not to reconnect."""
    name = invocation.args.name
    device = invocation.args.device
    check_user_name(name)
    body = {"user": name, "device": device} if device else {"user": name}
    try:
        reply = ask_router(invocation, "/api/v1/admin/kick", body)
    except CommandFailed as failure:
        if "(HTTP 404)" in str(failure):
            target = f"{name} on {device}" if device else name
            raise CommandFailed(f"{target} is not logged in") from None
        raise
    # The router writes the admin event, naming the operator whose token it was.
    if invocation.args.json:
        invocation.say_json(reply)
        return EXIT_OK
    for each in reply.get("devices") or [reply]:
        invocation.say(
            f"kicked {name} on {each.get('device', '?')} "
            f"(session {each['session_id']} on node {each['node']})"
        )
    return EXIT_OK


@dataclass(frozen=True)
class Subcommand:
    path: tuple[str, ...]
    help: str
    run: Callable[[Invocation], int]
    arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments


GROUP_HELP: dict[tuple[str, ...], str] = {
    ("db",): "the database schema",
    ("user",): "accounts",
    ("group",): "groups (read from the database)",
    ("push",): "push registrations (read from the database)",
}

SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand(("check-config",), "validate the config file as the daemon does", check_config),
    Subcommand(("db", "upgrade"), "migrate the database to the code's revision", db_upgrade),
    Subcommand(
        ("user", "add"),
        "add a user; the password from stdin, or asked twice",
        user_add,
        _user_add_arguments,
    ),
    Subcommand(("user", "passwd"), "set a user's password", user_passwd, _user_name_argument),
    Subcommand(("user", "del"), "delete a user", user_del, _user_name_argument),
    Subcommand(("user", "list"), "list the users", user_list, _user_list_arguments),
    Subcommand(("online",), "who is online (asks the running router)", online, _online_arguments),
    Subcommand(
        ("kick",),
        "end a user's session (asks the running router); the client does not reconnect",
        kick,
        _kick_arguments,
    ),
    Subcommand(
        ("limits",),
        "show, raise or reset a user's own rate limits (read by the nodes within "
        "[limits] override_refresh)",
        limits,
        limits_arguments,
    ),
    Subcommand(
        ("push", "show"),
        "a user's push registrations, by device",
        push_show,
        push_show_arguments,
    ),
    Subcommand(("group", "list"), "list the groups", group_list, json_argument),
    Subcommand(("group", "show"), "a group and its members", group_show, group_show_arguments),
    Subcommand(
        ("keygen",),
        "rotate the node's RSA key (the old one is kept as .previous); with --admin, "
        "write an operator's admin token instead",
        keygen,
        keygen_arguments,
    ),
)


def build_parser(subcommands: Sequence[Subcommand] = SUBCOMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cimctl", description="Administer a cim node.")
    add_version_option(parser)
    parser.add_argument(
        "--config",
        default=default_config_path(),
        metavar="PATH",
        help=f"the node's config (default: {LOCAL_CONFIG} if present, else {SYSTEM_CONFIG})",
    )
    parser.add_argument(
        "--operator",
        default=os.environ.get("CIM_OPERATOR") or None,
        metavar="NAME",
        help="whose admin token to send to the router (default: $CIM_OPERATOR, else the "
        "only token in [admin] token_file)",
    )
    choosers: dict[tuple[str, ...], argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    parsers: dict[tuple[str, ...], argparse.ArgumentParser] = {(): parser}

    def chooser(path: tuple[str, ...]) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        if path not in choosers:
            parent = parser_for(path)
            dest = "command" if not path else f"{'_'.join(path)}_command"
            choosers[path] = parent.add_subparsers(dest=dest, metavar="COMMAND", required=True)
        return choosers[path]

    def parser_for(path: tuple[str, ...]) -> argparse.ArgumentParser:
        if path not in parsers:
            help_text = GROUP_HELP.get(path, "")
            parsers[path] = chooser(path[:-1]).add_parser(path[-1], help=help_text)
        return parsers[path]

    for subcommand in subcommands:
        leaf = chooser(subcommand.path[:-1]).add_parser(
            subcommand.path[-1], help=subcommand.help, description=subcommand.help
        )
        parsers[subcommand.path] = leaf
        subcommand.arguments(leaf)
        leaf.set_defaults(subcommand=subcommand)
    return parser


def _parse(
    parser: argparse.ArgumentParser, argv: Sequence[str], stdout: TextIO, stderr: TextIO
) -> argparse.Namespace | int:
    """Parsed arguments, or the exit status argparse chose (usage error, --help)."""
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            return parser.parse_args(argv)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    stdin = stdin if stdin is not None else sys.stdin
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    parsed = _parse(build_parser(), sys.argv[1:] if argv is None else argv, stdout, stderr)
    if isinstance(parsed, int):
        return parsed
    invocation = Invocation(parsed, stdin, stdout, stderr)
    subcommand: Subcommand = parsed.subcommand
    try:
        return subcommand.run(invocation)
    except ConfigError as exc:
        print(str(exc), file=stderr)
        return EXIT_USAGE
    except CommandFailed as exc:
        print(f"cimctl: {exc}", file=stderr)
        return exc.status
    except (InvalidUserName, InvalidUserKind) as exc:
        print(f"cimctl: {exc}", file=stderr)
        return EXIT_USAGE
    except (UserExists, NoSuchUser, WeakPassword, DatabaseRevisionError) as exc:
        print(f"cimctl: {exc}", file=stderr)
        return EXIT_REFUSED
    except SQLAlchemyError as exc:
        print(f"cimctl: database error: {_first_line(exc)}", file=stderr)
        return EXIT_REFUSED
    except OSError as exc:
        print(f"cimctl: {exc}", file=stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print("cimctl: interrupted", file=stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

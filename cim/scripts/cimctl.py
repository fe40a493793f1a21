"""cimctl: the operator's command line for a cim node.

A short-lived process, so it blocks freely: it opens the database the way the daemon
does (SQLite is created and migrated, PostgreSQL must be at the code's revision) and
runs the same account rules and transactions inline.

Every expected problem ends in one line on stderr and an exit status, never a
traceback: 0 done, 1 refused (the user exists, no such user, a weak password, the
database is behind), 2 usage or configuration errors.

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
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from getpass import getpass
from typing import Any, TextIO

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from cim.accounts.store import (
    BlockingAccountStore,
    InvalidUserKind,
    InvalidUserName,
    NoSuchUser,
    UserExists,
    WeakPassword,
    check_user_kind,
    check_user_name,
)
from cim.config import CimConfig, ConfigError, load_config
from cim.storage.database import DatabaseRevisionError, open_engine, upgrade
from cim.storage.schema import USER_KINDS

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2

LOCAL_CONFIG = "etc/cim.ini"
SYSTEM_CONFIG = "/etc/cim/cim.ini"


class CommandFailed(Exception):
    """An expected failure: main prints the message as one line and exits with status."""

    def __init__(self, message: str, status: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.status = status


def default_config_path() -> str:
    """The checkout's config when run from one, else the system-wide file."""
    return LOCAL_CONFIG if os.path.exists(LOCAL_CONFIG) else SYSTEM_CONFIG


@dataclass
class Invocation:
    """One run of cimctl: parsed arguments, the streams, and the config loaded on demand."""

    args: argparse.Namespace
    stdin: TextIO
    stdout: TextIO
    stderr: TextIO
    _config: CimConfig | None = field(default=None, repr=False)

    @property
    def config_path(self) -> str:
        return str(self.args.config)

    @property
    def config(self) -> CimConfig:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def say(self, line: str) -> None:
        print(line, file=self.stdout)

    def record(self, action: str, target: str) -> None:
        """An admin action in the operation log (design: 用户的操作日志)."""
        import getpass

        from cim.oplog import ADMIN, OperationLog

        config = self.config
        log = OperationLog(config.operation_log_path, node=config.node.id, clock=time.time)
        try:
            log.emit(ADMIN, user=getpass.getuser(), action=action, target=target)
        finally:
            log.close()

    @contextlib.contextmanager
    def accounts(self) -> Iterator[BlockingAccountStore]:
        engine = open_engine(self.config.database_url)
        try:
            yield BlockingAccountStore(engine, self.config.accounts, clock=time.time)
        finally:
            engine.dispose()


def shown_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


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
    check_user_name(name)
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
        "--json", action="store_true", help="one JSON array of {name, kind, created_at}"
    )


def user_list(invocation: Invocation) -> int:
    with invocation.accounts() as accounts:
        records = accounts.list_users()
    if invocation.args.json:
        rows = [{"name": r.name, "kind": r.kind, "created_at": r.created_at} for r in records]
        invocation.say(json.dumps(rows))
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
    """GET path (POST body as JSON when given) on the running router; its JSON reply."""
    url = f"{router_base_url(invocation.config)}{path}"
    request = urllib.request.Request(url)
    if body is not None:
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
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
        raise CommandFailed(f"cannot reach the router at {url}: {error}") from None


def online(invocation: Invocation) -> int:
    """Ask the running router (it sees the whole cluster's state) who is online."""
    args = invocation.args
    page = ask_router(invocation, f"/api/v1/online?offset={args.offset}&limit={args.limit}")
    if args.json:
        invocation.say(json.dumps(page))
        return EXIT_OK
    invocation.say(f"{page['total']} online")
    for node, count in page["nodes"].items():
        invocation.say(f"  {node}: {count}")
    for user in page["users"]:
        invocation.say(user)
    return EXIT_OK


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def _kick_arguments(parser: argparse.ArgumentParser) -> None:
    _user_name_argument(parser)
    _json_argument(parser)


def kick(invocation: Invocation) -> int:
    """End a user's session through the router; the client is told not to reconnect."""
    name = invocation.args.name
    check_user_name(name)
    try:
        reply = ask_router(invocation, "/api/v1/admin/kick", {"user": name})
    except CommandFailed as failure:
        if "(HTTP 404)" in str(failure):
            raise CommandFailed(f"{name} is not logged in") from None
        raise
    invocation.record("user.kick", name)
    if invocation.args.json:
        invocation.say(json.dumps(reply))
    else:
        invocation.say(f"kicked {name} (session {reply['session_id']} on node {reply['node']})")
    return EXIT_OK


@contextlib.contextmanager
def _database(invocation: Invocation) -> Iterator[Any]:
    """One read transaction on the node's database (its schema must be current)."""
    engine = open_engine(invocation.config.database_url)
    try:
        with engine.begin() as connection:
            yield connection
    finally:
        engine.dispose()


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _table(invocation: Invocation, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)]
        invocation.say("  ".join(cells).rstrip())


def group_list(invocation: Invocation) -> int:
    from cim.storage.groups import all_groups_txn

    with _database(invocation) as connection:
        records = all_groups_txn(connection)
    if invocation.args.json:
        rows = [
            {
                "id": r.id,
                "name": r.name,
                "owner": r.owner,
                "admins": list(r.admins),
                "members": r.member_count,
                "created_at": r.created_at,
            }
            for r in records
        ]
        invocation.say(json.dumps(rows))
        return EXIT_OK
    _table(
        invocation,
        ("ID", "NAME", "OWNER", "MEMBERS", "CREATED"),
        [(r.id, r.name, r.owner, str(r.member_count), _when(r.created_at)) for r in records],
    )
    return EXIT_OK


def _group_show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("group", help="the group's id, or its name when no other group has it")
    _json_argument(parser)


def group_show(invocation: Invocation) -> int:
    from cim.storage.groups import AmbiguousGroupName, GroupNotFound, group_detail_txn

    ref = invocation.args.group
    try:
        with _database(invocation) as connection:
            record, members = group_detail_txn(connection, ref)
    except GroupNotFound:
        raise CommandFailed(f"no such group: {ref}") from None
    except AmbiguousGroupName as exc:
        raise CommandFailed(
            f"{len(exc.group_ids)} groups are named {ref!r} ({', '.join(exc.group_ids)}): "
            "use the group id"
        ) from None
    if invocation.args.json:
        detail = {
            "id": record.id,
            "name": record.name,
            "owner": record.owner,
            "created_at": record.created_at,
            "members": [
                {"user": m.user, "role": m.role, "joined_at": m.joined_at} for m in members
            ],
        }
        invocation.say(json.dumps(detail))
        return EXIT_OK
    invocation.say(f"group {record.id}: {record.name}")
    invocation.say(
        f"owner {record.owner}, {record.member_count} members, created {_when(record.created_at)}"
    )
    _table(
        invocation,
        ("USER", "ROLE", "JOINED"),
        [(m.user, m.role, _when(m.joined_at)) for m in members],
    )
    return EXIT_OK


def _keygen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bits", type=int, default=None, help="default: [im] rsa_key_bits")
    _json_argument(parser)


def _write_private(path: str, data: bytes) -> None:
    """data at path, atomically, never readable by others (mode 0600 from the start)."""
    temporary = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def keygen(invocation: Invocation) -> int:
    """A new node key at the configured path; the old one is kept as PATH.previous."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from cim.protocols.crypto import MIN_RSA_BITS, NodeKey

    config = invocation.config
    path = config.rsa_key_path
    bits = invocation.args.bits or config.im.rsa_key_bits
    if bits < MIN_RSA_BITS:
        raise CommandFailed(f"--bits {bits}: at least {MIN_RSA_BITS} are required", EXIT_USAGE)
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    key = NodeKey(private)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    previous = path + ".previous"
    had_key = os.path.exists(path)
    if had_key:
        with open(path, "rb") as handle:
            _write_private(previous, handle.read())
    _write_private(path, pem)
    invocation.record("node.keygen", key.fingerprint.hex())
    if invocation.args.json:
        invocation.say(
            json.dumps(
                {
                    "path": path,
                    "previous": previous if had_key else None,
                    "bits": bits,
                    "fingerprint": key.fingerprint.hex(),
                }
            )
        )
        return EXIT_OK
    invocation.say(f"new node key {path} ({bits} bits)")
    if had_key:
        invocation.say(f"the old key is kept as {previous}")
    invocation.say(f"fingerprint (SHA-256): {key.fingerprint.hex()}")
    invocation.say(
        "restart the node to use it; clients get the new key at their next login "
        "(a client that pinned the old fingerprint must be told the new one)"
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
    Subcommand(("group", "list"), "list the groups", group_list, _json_argument),
    Subcommand(("group", "show"), "a group and its members", group_show, _group_show_arguments),
    Subcommand(
        ("keygen",),
        "rotate the node's RSA key (the old one is kept as .previous)",
        keygen,
        _keygen_arguments,
    ),
)


def build_parser(subcommands: Sequence[Subcommand] = SUBCOMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cimctl", description="Administer a cim node.")
    parser.add_argument(
        "--config",
        default=default_config_path(),
        metavar="PATH",
        help=f"the node's config (default: {LOCAL_CONFIG} if present, else {SYSTEM_CONFIG})",
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

"""cimctl's commands on what the node keeps: its groups (read from the database), its
RSA key and its operators' admin tokens."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

from cim.http.operators import (
    DEFAULT_OPERATOR,
    OPERATOR_NAME,
    TokenFileError,
    new_token,
    parse_tokens,
    with_token,
)
from cim.json_convention import iso_time, listing, present
from cim.scripts.invocation import (
    EXIT_OK,
    EXIT_USAGE,
    CommandFailed,
    Invocation,
    json_argument,
)
from cim.storage.database import open_engine


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
    """A time for the tables people read: local, to the second (JSON has ISO 8601 UTC)."""
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
                "created_at": iso_time(r.created_at),
            }
            for r in records
        ]
        invocation.say_json(listing(rows))
        return EXIT_OK
    _table(
        invocation,
        ("ID", "NAME", "OWNER", "MEMBERS", "CREATED"),
        [(r.id, r.name, r.owner, str(r.member_count), _when(r.created_at)) for r in records],
    )
    return EXIT_OK


def group_show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("group", help="the group's id, or its name when no other group has it")
    json_argument(parser)


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
            "created_at": iso_time(record.created_at),
            "members": [
                {"user": m.user, "role": m.role, "joined_at": iso_time(m.joined_at)}
                for m in members
            ],
        }
        invocation.say_json(detail)
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


def keygen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bits", type=int, default=None, help="default: [im] rsa_key_bits")
    parser.add_argument(
        "--admin",
        action="store_true",
        help="write a new admin token for an operator to [admin] token_file instead",
    )
    parser.add_argument(
        "--name",
        default=None,
        help=f"with --admin: the operator the token is for (default: {DEFAULT_OPERATOR}); "
        "an operator's earlier token stops working",
    )
    json_argument(parser)


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


def admin_keygen(invocation: Invocation) -> int:
    """A new admin token for one operator in ``[admin] token_file`` (mode 0600).

    The other operators' lines stay; the named operator's old token, if any, is
    replaced. The token itself is not printed: cimctl reads it from the file, and a
    scraper that needs a copy takes its line from there.
    """
    args = invocation.args
    if args.bits is not None:
        raise CommandFailed("--bits is for the node's RSA key, not --admin", EXIT_USAGE)
    name = args.name or DEFAULT_OPERATOR
    if OPERATOR_NAME.fullmatch(name) is None:
        raise CommandFailed(
            f"--name {name!r}: use 1-64 letters, digits, '.', '_' or '-'", EXIT_USAGE
        )
    path = invocation.config.admin_token_path
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        text = ""
    try:
        replaced = name in parse_tokens(text, path)
    except (TokenFileError, UnicodeDecodeError) as exc:
        raise CommandFailed(f"[admin] token_file: {exc}; fix it first") from None
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    _write_private(path, with_token(text, name, new_token()).encode())
    invocation.record("admin.keygen", name)
    if args.json:
        invocation.say_json({"path": path, "operator": name, "replaced": replaced})
        return EXIT_OK
    what = "replaced the admin token" if replaced else "new admin token"
    invocation.say(f"{what} for operator {name} in {path} (mode 0600)")
    invocation.say("the running node accepts it at once; cimctl online and kick send it")
    return EXIT_OK


def keygen(invocation: Invocation) -> int:
    """A new node key at the configured path; the old one is kept as PATH.previous."""
    if invocation.args.admin:
        return admin_keygen(invocation)
    if invocation.args.name is not None:
        raise CommandFailed("--name goes with --admin", EXIT_USAGE)
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
        invocation.say_json(
            present(
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

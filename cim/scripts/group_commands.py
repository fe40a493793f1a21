"""cim-client group create|add|invite|remove|leave|list|members|send, and the invitee's
accept|decline|invitations, over the IM connection (docs/privacy.md: nobody joins a
group without consent)."""

from __future__ import annotations

import argparse
from typing import Any

from cim.json_convention import iso_time, listing
from cim.reactor import ICimReactor
from cim.scripts.login import with_timeout
from cim.scripts.output import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, ClientExit, emit
from cim.scripts.records import outcome_record

REFUSED_CODES = frozenset(("forbidden", "not_accepted"))
"""Group answers' error codes that mean "not allowed" (exit status 4)."""


def add_group_commands(commands: Any) -> None:
    group = commands.add_parser("group", help="create, change, list and post to groups")
    group_commands = group.add_subparsers(dest="group_command", required=True)
    create = group_commands.add_parser(
        "create", help="create a group (you own it); members join or are invited"
    )
    create.add_argument("name")
    create.add_argument("members", nargs="*")
    for verb, text in (
        ("add", "add members (or invite those whose settings ask for it)"),
        ("invite", "invite users: they join when they accept"),
        ("remove", "remove members, or withdraw invitations"),
    ):
        change = group_commands.add_parser(verb, help=text)
        change.add_argument("group", help="the group's id, or its name if unambiguous")
        change.add_argument("users", nargs="+")
    for verb, text in (
        ("accept", "accept an invitation: join the group"),
        ("decline", "decline an invitation"),
    ):
        answer = group_commands.add_parser(verb, help=text)
        answer.add_argument("group", help="the group's id, or its name")
    group_commands.add_parser("invitations", help="invitations waiting for your answer")
    leave = group_commands.add_parser("leave", help="leave a group")
    leave.add_argument("group")
    group_commands.add_parser("list", help="the groups you are in")
    members = group_commands.add_parser("members", help="a group's members")
    members.add_argument("group")
    group_send = group_commands.add_parser(
        "send", help='post a text to a group; its status is "accepted" once the node has it'
    )
    group_send.add_argument("group")
    group_send.add_argument("text")
    group_send.add_argument("--timeout", type=float, default=200.0)


def invitation_json(invitation: Any) -> dict[str, Any]:
    record = group_json(invitation.group)
    record["invited_by"] = invitation.invited_by
    record["invited_at"] = iso_time(invitation.invited_at_ms / 1000)
    return record


def group_json(info: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": info.id,
        "name": info.name,
        "owner": info.owner,
        "admins": list(info.admins),
        "member_count": info.member_count,
    }
    if info.created_at_ms:
        record["created_at"] = iso_time(info.created_at_ms / 1000)
    return record


async def resolve_group(client: Any, reference: str) -> str:
    """A group id from an id or a name the user has exactly one group of."""
    from cim.protocols import cim_pb2

    answer = await client.group_request(cim_pb2.GroupRequest(list=cim_pb2.ListGroups()))
    if not answer.ok:
        raise ClientExit(EXIT_FAILED, f"cannot list your groups: {answer.message}")
    matches = [g.id for g in answer.groups if reference in (g.id, g.name)]
    if len(matches) == 1:
        return str(matches[0])
    if not matches:
        raise ClientExit(EXIT_FAILED, f"you are in no group {reference!r}")
    raise ClientExit(
        EXIT_FAILED, f"you are in {len(matches)} groups named {reference!r}: use an id"
    )


async def group_command(reactor: ICimReactor, client: Any, options: argparse.Namespace) -> int:
    from cim.protocols import cim_pb2

    verb = options.group_command
    if verb == "send":
        group_id = await resolve_group(client, options.group)
        outcome = await with_timeout(
            reactor, client.send_group(group_id, options.text), options.timeout
        )
        if outcome is None:
            emit({"status": "failed", "reason": "timeout", "group": group_id})
            raise ClientExit(EXIT_FAILED, f"no answer from the node in {options.timeout:g} s")
        sent = {key: value for key, value in outcome_record(outcome).items() if key != "to"}
        emit(sent | {"group": group_id})
        if outcome.status != "accepted":
            raise ClientExit(EXIT_FAILED, f"not accepted: {outcome.reason or outcome.status}")
        return EXIT_OK
    requests = {
        "create": lambda: cim_pb2.GroupRequest(
            create=cim_pb2.CreateGroup(name=options.name, members=options.members)
        ),
        "add": lambda: cim_pb2.GroupRequest(
            add=cim_pb2.ChangeMembers(group=options.group, users=options.users)
        ),
        "invite": lambda: cim_pb2.GroupRequest(
            invite=cim_pb2.ChangeMembers(group=options.group, users=options.users)
        ),
        "accept": lambda: cim_pb2.GroupRequest(accept=cim_pb2.GroupRef(group=options.group)),
        "decline": lambda: cim_pb2.GroupRequest(decline=cim_pb2.GroupRef(group=options.group)),
        "invitations": lambda: cim_pb2.GroupRequest(invitations=cim_pb2.ListInvitations()),
        "remove": lambda: cim_pb2.GroupRequest(
            remove=cim_pb2.ChangeMembers(group=options.group, users=options.users)
        ),
        "leave": lambda: cim_pb2.GroupRequest(leave=cim_pb2.GroupRef(group=options.group)),
        "list": lambda: cim_pb2.GroupRequest(list=cim_pb2.ListGroups()),
        "members": lambda: cim_pb2.GroupRequest(members=cim_pb2.GroupRef(group=options.group)),
    }
    answer = await client.group_request(requests[verb]())
    if not answer.ok:
        status = EXIT_REFUSED if answer.error in REFUSED_CODES else EXIT_FAILED
        raise ClientExit(status, f"{answer.message} ({answer.error})")
    if verb == "list":
        emit(listing([group_json(info) for info in answer.groups]))
    elif verb == "members":
        emit(listing([{"user": m.user, "role": m.role} for m in answer.members]))
    elif verb == "invitations":
        emit(listing([invitation_json(invitation) for invitation in answer.invitations]))
    elif answer.HasField("group"):
        record = group_json(answer.group)
        if answer.invited:
            record["invited"] = list(answer.invited)
        emit(record)
    else:
        emit({"ok": True})
    return EXIT_OK

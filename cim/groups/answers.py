"""The answer to a GROUP_R frame: the request turned into ``GroupDirectory`` calls.

Every ``group`` field may be an id or the name of one of the actor's groups (the CLI
sends what the user typed); for ``accept`` and ``decline``, the name of a group the
actor is invited to.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger

from cim.protocols import cim_pb2
from cim.storage.group_invites import InvitationRecord
from cim.storage.groups import BadGroupRequest, GroupError, GroupRecord, MemberRecord

if TYPE_CHECKING:
    from cim.groups.directory import GroupDirectory

__all__ = ["answer", "group_info_proto", "invitation_proto"]

_log = Logger(namespace="cim.groups")


def group_info_proto(info: GroupRecord) -> cim_pb2.GroupInfo:
    return cim_pb2.GroupInfo(
        id=info.id,
        name=info.name,
        owner=info.owner,
        admins=list(info.admins),
        member_count=info.member_count,
        created_at_ms=int(info.created_at * 1000),
    )


def invitation_proto(invitation: InvitationRecord) -> cim_pb2.GroupInvitation:
    return cim_pb2.GroupInvitation(
        group=group_info_proto(invitation.group),
        invited_by=invitation.invited_by,
        invited_at_ms=int(invitation.invited_at * 1000),
    )


def _member_proto(member: MemberRecord) -> cim_pb2.GroupMember:
    return cim_pb2.GroupMember(user=member.user, role=member.role)


def _changed(reply: cim_pb2.GroupAnswer, info: GroupRecord) -> None:
    reply.group.CopyFrom(group_info_proto(info))
    reply.invited.extend(info.invited)


async def _answer(
    directory: GroupDirectory, actor: str, request: cim_pb2.GroupRequest, reply: cim_pb2.GroupAnswer
) -> None:
    op = request.WhichOneof("op")
    if op == "create":
        _changed(reply, await directory.create(actor, request.create.name, request.create.members))
    elif op == "rename":
        group_id = await directory.resolve(actor, request.rename.group)
        reply.group.CopyFrom(
            group_info_proto(await directory.rename(actor, group_id, request.rename.name))
        )
    elif op in ("add", "invite", "remove", "promote"):
        change: cim_pb2.ChangeMembers = getattr(request, op)
        group_id = await directory.resolve(actor, change.group)
        method = {
            "add": directory.add,
            "invite": directory.invite,
            "remove": directory.remove,
            "promote": directory.promote,
        }[op]
        _changed(reply, await method(actor, group_id, list(change.users)))
    elif op in ("accept", "decline"):
        ref: cim_pb2.GroupRef = getattr(request, op)
        group_id = await directory.resolve_invitation(actor, ref.group)
        if op == "accept":
            reply.group.CopyFrom(group_info_proto(await directory.accept(actor, group_id)))
        else:
            await directory.decline(actor, group_id)
    elif op == "invitations":
        found = await directory.invitations(actor)
        reply.invitations.extend(invitation_proto(invitation) for invitation in found)
    elif op == "leave":
        group_id = await directory.resolve(actor, request.leave.group)
        await directory.leave(actor, group_id)
    elif op == "dissolve":
        group_id = await directory.resolve(actor, request.dissolve.group)
        await directory.dissolve(actor, group_id)
    elif op == "list":
        infos = await directory.list_for(actor)
        reply.groups.extend(group_info_proto(info) for info in infos)
    elif op == "members":
        group_id = await directory.resolve(actor, request.members.group)
        members = await directory.members(actor, group_id)
        reply.members.extend(_member_proto(member) for member in members)
    else:
        raise BadGroupRequest("the request names no group operation")


async def answer(
    directory: GroupDirectory, actor: str, request: cim_pb2.GroupRequest
) -> cim_pb2.GroupAnswer:
    """The GROUP_A for a GROUP_R from actor; never raises.

    A refusal becomes ``ok=False`` with the error's code and message; anything
    unexpected is logged and answered with code "internal".
    """
    reply = cim_pb2.GroupAnswer(request_id=request.request_id)
    try:
        await _answer(directory, actor, request, reply)
    except GroupError as exc:
        return cim_pb2.GroupAnswer(
            request_id=request.request_id, error=exc.code, message=exc.message
        )
    except Exception:
        op = request.WhichOneof("op")
        _log.failure("group request {op} from {actor} failed", op=op, actor=actor)
        return cim_pb2.GroupAnswer(
            request_id=request.request_id,
            error="internal",
            message="the group request failed on the server; try again",
        )
    reply.ok = True
    return reply

"""Contacts, blocks and privacy settings over HTTP (docs/privacy.md, docs/logic.md).

The same operations as CONTACTS_R on the IM connection, through the same
``ContactBook``. ``?device=NAME`` makes a guardian act for a device it actively
guards (a watch's contacts are its guardians' to choose).
"""

from __future__ import annotations

from typing import Any

from cim.http.schema import TIMESTAMP, listing_of, object_schema
from cim.http.site import Reply
from cim.json_convention import iso_time, listing, present
from cim.logic.contacts import ContactBook
from cim.logic.http.accounts import NAME_PARAM
from cim.logic.http.api import LogicCall, LogicEndpoint, answer
from cim.storage.contacts import ContactList, PendingRecord, Settings
from cim.storage.schema import GROUP_ADDS, MESSAGE_POLICIES, READ_RECEIPTS

__all__ = ["contact_endpoints", "contact_list_json", "settings_json"]

_NAME = {"type": "string"}
_DEVICE_QUERY = {
    "device": {
        **NAME_PARAM,
        "maxLength": 64,
        "description": "act for this device account (its active guardians only)",
    }
}
SETTINGS_SCHEMA = object_schema(
    {
        "messages": {
            "type": "string",
            "enum": list(MESSAGE_POLICIES),
            "description": "who may send you 1:1 messages",
        },
        "group_adds": {
            "type": "string",
            "enum": [*GROUP_ADDS, "guardians"],
            "description": "who may add you to a group without an invitation "
            "(a device: its guardians)",
        },
        "read_receipts": {
            "type": "string",
            "enum": list(READ_RECEIPTS),
            "description": "whether others see what you read (your own devices always do)",
        },
    },
    ["messages", "group_adds", "read_receipts"],
)
LIST_SCHEMA = listing_of(
    object_schema(
        {
            "user": _NAME,
            "state": {
                "type": "string",
                "enum": ["contact", "incoming", "outgoing", "blocked"],
                "description": "`incoming`: waiting for your answer; "
                "`outgoing`: waiting for theirs",
            },
            "added_at": {**TIMESTAMP, "description": "a contact: since when"},
            "approved_by": {
                **_NAME,
                "description": "a device's contact: the guardian who approved it",
            },
            "requested_at": {**TIMESTAMP, "description": "a request: when it was made"},
            "device": {
                **_NAME,
                "description": "an incoming request: the device of yours it is for",
            },
            "requested_by": {
                **_NAME,
                "description": "a request made by someone other than `user` (a guardian "
                "for its device)",
            },
        },
        ["user", "state"],
    ),
    beside=SETTINGS_SCHEMA["properties"],
)
_CHANGE_SCHEMA = object_schema(
    {"user": _NAME, "status": {"type": "string"}},
    ["user", "status"],
)


def settings_json(settings: Settings) -> dict[str, Any]:
    return {
        "messages": settings.messages,
        "group_adds": settings.group_adds,
        "read_receipts": settings.read_receipts,
    }


def _pending_json(pending: PendingRecord, state: str) -> dict[str, Any]:
    return present(
        {
            "user": pending.user,
            "state": state,
            "device": pending.device,
            "requested_at": iso_time(pending.at),
            "requested_by": (
                pending.requested_by if pending.requested_by != pending.user else None
            ),
        }
    )


def contact_list_json(found: ContactList) -> dict[str, Any]:
    """The JSON convention's list, the same shape ``cim-client contacts list`` prints
    (cim.scripts.contact_commands.contact_list_json, from the IM frame's records): each
    entry's ``state`` is ``contact``, ``incoming``, ``outgoing`` or ``blocked``; the
    settings beside ``items``."""
    items: list[dict[str, Any]] = [
        present(
            {
                "user": contact.user,
                "state": "contact",
                "added_at": iso_time(contact.since),
                "approved_by": contact.approved_by,
            }
        )
        for contact in found.contacts
    ]
    items += [_pending_json(pending, "incoming") for pending in found.incoming]
    items += [_pending_json(pending, "outgoing") for pending in found.outgoing]
    items += [{"user": user, "state": "blocked"} for user in found.blocked]
    return listing(items, **settings_json(found.settings))


def contact_endpoints(book: ContactBook) -> list[LogicEndpoint]:
    def device_of(call: LogicCall) -> str | None:
        device = call.query.get("device")
        return None if device is None else str(device)

    async def list_contacts(call: LogicCall) -> Reply:
        found = await book.contact_list(call.user.user, device_of(call))
        return answer(200, contact_list_json(found))

    def change(method: Any) -> Any:
        async def serve(call: LogicCall) -> Reply:
            user = str(call.params["user"])
            status = await method(call.user.user, user, device_of(call))
            return answer(200, {"user": user, "status": status})

        return serve

    async def get_settings(call: LogicCall) -> Reply:
        return answer(200, settings_json(await book.settings(call.user.user)))

    async def change_settings(call: LogicCall) -> Reply:
        messages, group_adds = call.body.get("messages"), call.body.get("group_adds")
        receipts = call.body.get("read_receipts")
        settings = await book.change_settings(
            call.user.user,
            None if messages is None else str(messages),
            None if group_adds is None else str(group_adds),
            None if receipts is None else str(receipts),
        )
        return answer(200, settings_json(settings))

    user_param = {"user": NAME_PARAM}

    def operation(
        method: str, path: str, operation_id: str, summary: str, serve: Any, **more: Any
    ) -> LogicEndpoint:
        return LogicEndpoint(
            method,
            path,
            operation_id,
            summary,
            "contacts",
            change(serve),
            params=user_param,
            query=_DEVICE_QUERY,
            response=_CHANGE_SCHEMA,
            **more,
        )

    return [
        LogicEndpoint(
            "GET",
            "/contacts",
            "list_contacts",
            "Your contacts, the requests both ways, whom you block, your settings",
            "contacts",
            list_contacts,
            query=_DEVICE_QUERY,
            response=LIST_SCHEMA,
            errors=(403,),
            description=(
                "One entry per user in `items`, its `state` saying what they are to "
                "you. A guardian's `incoming` entries also hold the requests waiting "
                "for its devices (with `device`); `?device=` lists a device's own."
            ),
        ),
        operation(
            "POST",
            "/contacts/{user}",
            "request_contact",
            "Ask someone to be a contact (accepts their request if they asked first)",
            book.request,
            errors=(403, 409),
            description=(
                "`status` is `requested`, or `accepted` when they had asked you (or "
                "already are a contact). A request to a device goes to its guardians. "
                "403 `not_accepted`: no such user, or they do not accept requests from "
                "you (the two are not told apart)."
            ),
        ),
        operation(
            "POST",
            "/contacts/{user}/accept",
            "accept_contact",
            "Accept someone's request",
            book.accept,
            errors=(403,),
        ),
        operation(
            "POST",
            "/contacts/{user}/decline",
            "decline_contact",
            "Decline someone's request (they are not told)",
            book.decline,
            errors=(403,),
        ),
        operation(
            "DELETE",
            "/contacts/{user}",
            "remove_contact",
            "End a contact (for both sides), or withdraw your request",
            book.remove,
            errors=(403,),
        ),
        operation(
            "PUT",
            "/blocks/{user}",
            "block_user",
            "Refuse everything from someone (they are not told)",
            book.block,
            errors=(403, 409),
            description=(
                "Their messages, contact requests and group invitations are refused "
                "as if you had no account, and they no longer see you online. The "
                "contact, requests both ways and their invitations to you end."
            ),
        ),
        operation(
            "DELETE",
            "/blocks/{user}",
            "unblock_user",
            "Lift a block (a contact it ended stays ended)",
            book.unblock,
            errors=(403,),
        ),
        LogicEndpoint(
            "GET",
            "/me/privacy",
            "get_privacy",
            "Your privacy settings, as in effect",
            "contacts",
            get_settings,
            response=SETTINGS_SCHEMA,
        ),
        LogicEndpoint(
            "PATCH",
            "/me/privacy",
            "update_privacy",
            "Change who may message you, who may add you to groups, read receipts",
            "contacts",
            change_settings,
            body={
                **object_schema(
                    {
                        "messages": {"type": "string", "enum": list(MESSAGE_POLICIES)},
                        "group_adds": {"type": "string", "enum": list(GROUP_ADDS)},
                        "read_receipts": {"type": "string", "enum": list(READ_RECEIPTS)},
                    }
                ),
                "minProperties": 1,
            },
            response=SETTINGS_SCHEMA,
            errors=(403,),
            description="A device's settings are fixed, except read_receipts.",
        ),
    ]

"""cim-client contacts list|request|accept|decline|remove|block|unblock|policy, over the
IM connection (CONTACTS_R; docs/privacy.md says who may reach whom).

``--for DEVICE`` acts for a device you actively guard: a watch's contacts are its
guardians' to choose. Output follows the JSON convention (cim.scripts.output).
"""

from __future__ import annotations

import argparse
from typing import Any

from cim.json_convention import iso_time, listing, present
from cim.scripts.output import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    ClientExit,
    emit,
)

__all__ = ["add_contact_commands", "contact_list_json", "contacts_command"]

REFUSED_CODES = frozenset(("not_accepted", "forbidden"))
"""Contact answers' error codes that mean "not allowed" (exit status 4)."""

_CHANGES = {
    "request": "ask USER to be a contact (accepts theirs if they asked first)",
    "accept": "accept USER's request",
    "decline": "decline USER's request (they are not told)",
    "remove": "end a contact, or withdraw your request",
    "block": "refuse everything from USER (they are not told)",
    "unblock": "lift a block",
}


def add_contact_commands(commands: Any) -> None:
    contacts = commands.add_parser(
        "contacts", help="your contacts, requests, blocks and who may message you"
    )
    verbs = contacts.add_subparsers(dest="contacts_command", required=True)
    listed = verbs.add_parser("list", help="contacts, requests both ways, blocks, settings")
    for_device(listed)
    for verb, text in _CHANGES.items():
        change = verbs.add_parser(verb, help=text)
        change.add_argument("contact", metavar="USER")
        for_device(change)
    policy = verbs.add_parser(
        "policy", help="show or set who may message you and who may add you to groups"
    )
    policy.add_argument(
        "messages",
        nargs="?",
        choices=("contacts", "everyone"),
        help="who may send you 1:1 messages (contacts: strangers must ask first)",
    )
    policy.add_argument(
        "--group-adds",
        choices=("contacts", "nobody"),
        help="who may add you to a group without an invitation",
    )
    policy.add_argument(
        "--read-receipts",
        choices=("on", "off"),
        help="whether others see what you read (off: your own devices still sync)",
    )


def for_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--for",
        dest="for_device",
        metavar="DEVICE",
        help="act for a device you actively guard",
    )


def _pending_json(pending: Any, state: str) -> dict[str, Any]:
    # The JSON convention: no "" or null placeholders, so a request for no device
    # (a person's own) and one its own user made leave those keys out.
    return present(
        {
            "user": pending.user,
            "state": state,
            "device": pending.device or None,
            "requested_at": iso_time(pending.at_ms / 1000),
            "requested_by": (
                pending.requested_by if pending.requested_by != pending.user else None
            ),
        }
    )


def contact_list_json(book: Any) -> dict[str, Any]:
    """One list, as the convention wants: each entry's ``state`` is ``contact``,
    ``incoming`` (waiting for your answer; ``device``: for which of your devices),
    ``outgoing`` (waiting for theirs) or ``blocked``; the settings beside it."""
    items: list[dict[str, Any]] = [
        present(
            {
                "user": contact.user,
                "state": "contact",
                "added_at": iso_time(contact.since_ms / 1000),
                "approved_by": contact.approved_by,
            }
        )
        for contact in book.contacts
    ]
    items += [_pending_json(pending, "incoming") for pending in book.incoming]
    items += [_pending_json(pending, "outgoing") for pending in book.outgoing]
    items += [{"user": user, "state": "blocked"} for user in book.blocked]
    return listing(
        items,
        messages=book.settings.messages,
        group_adds=book.settings.group_adds,
        read_receipts=book.settings.read_receipts,
    )


async def contacts_command(client: Any, options: argparse.Namespace) -> int:
    from cim.protocols import cim_pb2

    verb = options.contacts_command
    request = cim_pb2.ContactsRequest(device=getattr(options, "for_device", None) or "")
    if verb == "list":
        request.list.SetInParent()
    elif verb == "policy":
        request.settings.messages = options.messages or ""
        request.settings.group_adds = options.group_adds or ""
        request.settings.read_receipts = options.read_receipts or ""
    else:
        getattr(request, verb).user = options.contact
    answer = await client.contacts_request(request)
    if not answer.ok:
        status = EXIT_REFUSED if answer.error in REFUSED_CODES else EXIT_FAILED
        raise ClientExit(status, f"{answer.message} ({answer.error})")
    if verb == "list":
        emit(contact_list_json(answer.book))
    elif verb == "policy":
        settings = answer.settings
        emit(
            {
                "messages": settings.messages,
                "group_adds": settings.group_adds,
                "read_receipts": settings.read_receipts,
            }
        )
    else:
        emit({"user": options.contact, "status": answer.status})
    return EXIT_OK

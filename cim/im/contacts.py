"""CONTACTS_R: contacts, requests, blocks and privacy settings over the IM connection;
and the node's contact rules (``ContactDirectory``) that the other rooms ask.

The rooms ask the directory's ``contacts`` whether a 1:1 message may go (``direct``),
whose presence a user may see (``presence``); the group directory applies the same
rules to invitations. ``ContactDirectory`` puts the node's ``ContactBook``
(cim.logic.contacts) behind that interface and turns CONTACTS_R frames into its calls.
Events (a request, a new contact) reach the other side as system notices, stored for
an account that is offline like any message (docs/privacy.md lists them).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cim.im.collaborators import ClientSession, Directory, FrameTable, log_failure
from cim.logic.contacts import ContactBook
from cim.logic.errors import BadInput, LogicError
from cim.protocols import cim_pb2
from cim.storage.contacts import ContactList, PendingRecord, Settings

__all__ = ["ContactDirectory", "ContactRequests", "answer", "book_proto", "settings_proto"]

CONTACTS_A = cim_pb2.CONTACTS_A
_CHANGES = ("request", "accept", "decline", "remove", "block", "unblock")

_log = Logger(namespace="cim.im.contacts")


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def settings_proto(settings: Settings) -> cim_pb2.PrivacySettings:
    return cim_pb2.PrivacySettings(
        messages=settings.messages,
        group_adds=settings.group_adds,
        read_receipts=settings.read_receipts,
    )


def _pending_proto(pending: PendingRecord) -> cim_pb2.PendingContact:
    return cim_pb2.PendingContact(
        user=pending.user,
        device=pending.device or "",
        at_ms=_ms(pending.at),
        requested_by=pending.requested_by,
    )


def book_proto(found: ContactList) -> cim_pb2.ContactBook:
    return cim_pb2.ContactBook(
        contacts=[
            cim_pb2.Contact(
                user=contact.user,
                since_ms=_ms(contact.since),
                approved_by=contact.approved_by or "",
            )
            for contact in found.contacts
        ],
        incoming=[_pending_proto(pending) for pending in found.incoming],
        outgoing=[_pending_proto(pending) for pending in found.outgoing],
        blocked=found.blocked,
        settings=settings_proto(found.settings),
    )


async def answer(
    book: ContactBook, actor: str, request: cim_pb2.ContactsRequest
) -> cim_pb2.ContactsAnswer:
    """The CONTACTS_A for a CONTACTS_R from ``actor``; never raises.

    A refusal is ``ok=False`` with the logic service's code (``not_accepted``,
    ``forbidden``, ``not_found``, ``conflict``, ``bad_request``); anything unexpected
    is logged and answered ``internal``.
    """
    reply = cim_pb2.ContactsAnswer(request_id=request.request_id)
    device = request.device or None
    op = request.WhichOneof("op")
    try:
        if op == "list":
            reply.book.CopyFrom(book_proto(await book.contact_list(actor, device)))
        elif op in _CHANGES:
            user: str = getattr(request, op).user
            change = {
                "request": book.request,
                "accept": book.accept,
                "decline": book.decline,
                "remove": book.remove,
                "block": book.block,
                "unblock": book.unblock,
            }[op]
            reply.status = await change(actor, user, device)
        elif op == "settings":
            if device is not None:
                raise BadInput("bad_request", "privacy settings are each person's own")
            wanted = request.settings
            settings = await book.change_settings(
                actor,
                wanted.messages or None,
                wanted.group_adds or None,
                wanted.read_receipts or None,
            )
            reply.settings.CopyFrom(settings_proto(settings))
        else:
            raise BadInput("bad_request", "the request names no contact operation")
    except LogicError as refusal:
        return cim_pb2.ContactsAnswer(
            request_id=request.request_id, error=refusal.code, message=refusal.message
        )
    except Exception:
        _log.failure("contact request {op} from {actor} failed", op=op, actor=actor)
        return cim_pb2.ContactsAnswer(
            request_id=request.request_id,
            error="internal",
            message="the contact request failed on the server; try again",
        )
    reply.ok = True
    return reply


class ContactDirectory:
    """The node's ``ContactRules``: a ``ContactBook`` as the rooms ask it."""

    def __init__(self, book: ContactBook) -> None:
        self.book = book

    def known(self, sender: str, receiver: str) -> bool | None:
        return self.book.known(sender, receiver)

    def account_known(self, sender: str, receiver: str) -> bool:
        return self.book.known(sender, receiver) is True

    def may_message(self, sender: str, receiver: str) -> Deferred[bool]:
        return self.book.may_message(sender, receiver)

    def circle(self, user: str) -> Deferred[list[str]]:
        return self.book.circle(user)

    def answer(
        self, actor: str, request: cim_pb2.ContactsRequest
    ) -> Deferred[cim_pb2.ContactsAnswer]:
        return Deferred.fromCoroutine(answer(self.book, actor, request))


class ContactRequests:
    """Answers CONTACTS_R through the directory's contact rules."""

    log = Logger()

    def __init__(self, directory: Directory) -> None:
        self._directory = directory

    def frame_table(self) -> FrameTable:
        return {cim_pb2.CONTACTS_R: (cim_pb2.ContactsRequest, self.contacts_requested)}

    def contacts_requested(self, session: ClientSession, request: cim_pb2.ContactsRequest) -> None:
        d = self._directory.contacts.answer(session.record.user, request)
        d.addCallback(lambda reply: session.deliver(CONTACTS_A, reply))
        d.addErrback(log_failure, self.log, "answer a contact request")

"""Groups: who is in which group, who may change it, and who is invited to join.

The rules that depend on stored state (roles, the member limit, dissolved groups,
whether someone may be added or only invited: docs/privacy.md) are checked inside
the transactions of ``cim.storage.groups`` and ``cim.storage.group_invites``, against
the rows they change; this module checks what needs no database (names, list sizes,
the shape of an id) before handing work to the pool, tells invitees with a system
notice, and keeps the member lists that group fan-out reads for every message.
``cim.groups.answers`` turns GROUP_R frames into these calls.

Member lists are cached in memory because fan-out asks for them on every group
message. Every change made through a ``GroupDirectory`` drops the group's entry
(before and after its transaction, so a load that raced the change is not kept).
Changes made elsewhere, by another node or by cimctl, are only seen once an entry is
older than ``cache_ttl``, or when the node is told through ``forget``: a node that
hears of a change over the bus should call it.
"""

from __future__ import annotations

import base64
import re
import secrets
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec, TypeVar

from sqlalchemy.engine import Connection
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from cim.accounts.store import InvalidUserName, check_user_name
from cim.caching import refresh_due
from cim.groups.answers import answer, group_info_proto
from cim.logic.contacts import Announcer, Silent
from cim.protocols import cim_pb2
from cim.storage.contacts import PrivacyDefaults
from cim.storage.database import Database
from cim.storage.group_invites import (
    InvitationRecord,
    accept_invitation_txn,
    decline_invitation_txn,
    find_invitations_txn,
    invitations_txn,
)
from cim.storage.groups import (
    AmbiguousGroupName,
    BadGroupRequest,
    GroupConflict,
    GroupDissolved,
    GroupError,
    GroupForbidden,
    GroupFull,
    GroupNotAccepted,
    GroupNotFound,
    GroupRecord,
    LeaveRecord,
    MemberRecord,
    NoSuchUsers,
    add_members_txn,
    create_group_txn,
    dissolve_group_txn,
    find_groups_txn,
    group_members_txn,
    groups_of_txn,
    invite_members_txn,
    leave_group_txn,
    member_names_txn,
    promote_members_txn,
    remove_members_txn,
    rename_group_txn,
)
from cim.storage.schema import GROUP_ID_LENGTH, GROUP_NAME_MAX

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_CACHE_TTL",
    "DEFAULT_MAX_MEMBERS",
    "AmbiguousGroupName",
    "BadGroupRequest",
    "GroupConflict",
    "GroupDirectory",
    "GroupDissolved",
    "GroupError",
    "GroupForbidden",
    "GroupFull",
    "GroupInfo",
    "GroupNotAccepted",
    "GroupNotFound",
    "Invitation",
    "LeaveRecord",
    "Member",
    "NoSuchUsers",
    "answer",
    "check_group_name",
    "group_info_proto",
    "is_group_id",
    "new_group_id",
]

T = TypeVar("T")
P = ParamSpec("P")

GroupInfo = GroupRecord
Member = MemberRecord
Invitation = InvitationRecord

DEFAULT_MAX_MEMBERS = 2000
DEFAULT_CACHE_SIZE = 10_000
"""Groups whose member lists are kept; the least recently used go first."""
DEFAULT_CACHE_TTL = 60.0
"""Seconds a member list is trusted: bounds how long another node's change goes unseen."""

DEFAULT_PRIVACY = PrivacyDefaults()

_GROUP_ID = re.compile(rf"[a-z2-7]{{{GROUP_ID_LENGTH}}}")


def new_group_id() -> str:
    """16 random bytes: nobody learns a group's id except by being told it."""
    return base64.b32encode(secrets.token_bytes(16)).decode("ascii").rstrip("=").lower()


def is_group_id(ref: str) -> bool:
    return _GROUP_ID.fullmatch(ref) is not None


def check_group_name(name: str) -> None:
    """1-64 characters, no control characters, no surrounding white space.

    Names are shown in lists and typed on the command line to pick a group, so a name
    that looks blank, or differs from another only by invisible padding, is refused.
    """
    if not 1 <= len(name) <= GROUP_NAME_MAX:
        raise BadGroupRequest(f"a group name has 1 to {GROUP_NAME_MAX} characters")
    if name != name.strip():
        raise BadGroupRequest("a group name cannot start or end with white space")
    if any(unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") for char in name):
        raise BadGroupRequest("a group name cannot contain control characters")


@dataclass
class _Members:
    names: tuple[str, ...]
    lookup: frozenset[str]
    loaded_at: float


@dataclass
class _Load:
    """One database read shared by everyone who asks while it runs."""

    waiters: list[Deferred[_Members]] = field(default_factory=list)


class GroupDirectory:
    """Every group operation of a node; results and refusals come as Deferreds.

    Refusals are ``GroupError`` subclasses whose ``code`` is the wire's
    ``GroupAnswer.error``. Methods take group ids; ``resolve`` turns what a user typed
    (an id, or the name of one of their groups) into one.
    """

    def __init__(
        self,
        db: Database,
        clock: IReactorTime,
        max_members: int = DEFAULT_MAX_MEMBERS,
        cache_size: int = DEFAULT_CACHE_SIZE,
        cache_ttl: float | None = DEFAULT_CACHE_TTL,
        new_id: Callable[[], str] = new_group_id,
        defaults: PrivacyDefaults = DEFAULT_PRIVACY,
    ) -> None:
        if max_members < 1:
            raise ValueError("max_members must be at least 1")
        self._db = db
        self._clock = clock
        self.max_members = max_members
        self.defaults = defaults
        """What accounts that never chose their privacy settings follow."""
        self.notices: Announcer = Silent()
        """How invitees are told; the daemon gives the node's notices once it has them."""
        self._new_id = new_id
        self._members = _MemberCache(db, clock, cache_size, cache_ttl)
        self.settled: Callable[[], Deferred[None]] = lambda: succeed(None)
        """The timelines' read barrier (``Timelines.settled``; the daemon gives it): a
        member joins at the group's ``last_seq``, which must count every message
        promised before the join."""

    # --- input checks -------------------------------------------------------------------

    def _users(self, users: Iterable[str], *, allow_empty: bool = False) -> list[str]:
        """De-duplicated, in the order given; refuses bad names and oversized lists."""
        unique = list(dict.fromkeys(users))
        if not unique and not allow_empty:
            raise BadGroupRequest("name at least one user")
        if len(unique) > self.max_members:
            raise BadGroupRequest(f"a group holds at most {self.max_members} members")
        for user in unique:
            try:
                check_user_name(user)
            except InvalidUserName as exc:
                raise BadGroupRequest(str(exc)) from None
        return unique

    @staticmethod
    def _group(group_id: str) -> str:
        if not is_group_id(group_id):
            raise GroupNotFound(f"no such group: {group_id!r}")
        return group_id

    def _change(
        self,
        group_id: str,
        txn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Deferred[T]:
        """Run a change, dropping the cached member list before and after it."""
        self.forget(group_id)

        def changed(result: T | Failure) -> T | Failure:
            self.forget(group_id)
            return result

        d: Deferred[T] = self.settled().addCallback(lambda _: self._db.run(txn, *args, **kwargs))
        d.addBoth(changed)
        return d

    # --- changes ------------------------------------------------------------------------

    def create(self, actor: str, name: str, members: Iterable[str] = ()) -> Deferred[GroupInfo]:
        """actor becomes the owner; members (actor among them or not) plain members,
        or invited where their settings ask for it (``GroupInfo.invited``)."""
        try:
            check_group_name(name)
            others = [user for user in self._users(members, allow_empty=True) if user != actor]
        except GroupError as exc:
            return fail(exc)
        group_id = self._new_id()
        now = self._clock.seconds()
        d = self._change(
            group_id,
            create_group_txn,
            group_id,
            name,
            actor,
            others,
            now,
            self.max_members,
            self.defaults,
        )
        return d.addCallback(self._tell_invited, actor)

    def rename(self, actor: str, group_id: str, name: str) -> Deferred[GroupInfo]:
        try:
            self._group(group_id)
            check_group_name(name)
        except GroupError as exc:
            return fail(exc)
        return self._change(group_id, rename_group_txn, group_id, actor, name)

    def add(self, actor: str, group_id: str, users: Iterable[str]) -> Deferred[GroupInfo]:
        """Users already in the group stay as they are; the others are added, or
        invited where their settings ask for it (``GroupInfo.invited``); one that may
        not be (no account, a policy or block against the actor) refuses them all."""
        return self._bring_in(add_members_txn, actor, group_id, users)

    def invite(self, actor: str, group_id: str, users: Iterable[str]) -> Deferred[GroupInfo]:
        """As ``add``, but persons are always invited (a guardian's device is added)."""
        return self._bring_in(invite_members_txn, actor, group_id, users)

    def _bring_in(
        self,
        txn: Callable[..., GroupInfo],
        actor: str,
        group_id: str,
        users: Iterable[str],
    ) -> Deferred[GroupInfo]:
        try:
            self._group(group_id)
            names = self._users(users)
        except GroupError as exc:
            return fail(exc)
        now = self._clock.seconds()
        d = self._change(
            group_id, txn, group_id, actor, names, now, self.max_members, self.defaults
        )
        return d.addCallback(self._tell_invited, actor)

    def _tell_invited(self, info: GroupInfo, actor: str) -> Deferred[GroupInfo]:
        """The invitees hear of it as a system notice ("group.invited")."""
        if not info.invited:
            return succeed(info)
        sent = Deferred.fromCoroutine(
            self.notices.send(
                info.invited, "group.invited", group=info.id, name=info.name, invited_by=actor
            )
        )
        return sent.addCallback(lambda _: info)

    # --- invitations ------------------------------------------------------------------

    def invitations(self, user: str) -> Deferred[list[Invitation]]:
        return self._db.run(invitations_txn, user)

    def accept(self, user: str, group_id: str) -> Deferred[GroupInfo]:
        """The invitee joins; refused when no invitation waits, or the group is full."""
        try:
            self._group(group_id)
        except GroupError as exc:
            return fail(exc)
        now = self._clock.seconds()
        return self._change(group_id, accept_invitation_txn, group_id, user, now, self.max_members)

    def decline(self, user: str, group_id: str) -> Deferred[None]:
        try:
            self._group(group_id)
        except GroupError as exc:
            return fail(exc)
        return self._db.run(decline_invitation_txn, group_id, user)

    def resolve_invitation(self, user: str, ref: str) -> Deferred[str]:
        """The group id ``ref`` means to an invitee: a group id, or the name of a group
        it is invited to (AmbiguousGroupName when several are)."""
        if not ref:
            return fail(BadGroupRequest("name a group (its id or its name)"))
        if len(ref) > max(GROUP_NAME_MAX, GROUP_ID_LENGTH):
            return fail(GroupNotFound(f"no invitation to {ref[:80]!r} is waiting for you"))

        def one(ids: list[str]) -> str:
            if not ids:
                raise GroupNotFound(f"no invitation to {ref!r} is waiting for you")
            if len(ids) > 1:
                raise AmbiguousGroupName(ref, ids)
            return ids[0]

        return self._db.run(find_invitations_txn, user, ref).addCallback(one)

    def remove(self, actor: str, group_id: str, users: Iterable[str]) -> Deferred[GroupInfo]:
        try:
            self._group(group_id)
            names = self._users(users)
        except GroupError as exc:
            return fail(exc)
        return self._change(group_id, remove_members_txn, group_id, actor, names)

    def promote(self, actor: str, group_id: str, users: Iterable[str]) -> Deferred[GroupInfo]:
        try:
            self._group(group_id)
            names = self._users(users)
        except GroupError as exc:
            return fail(exc)
        return self._change(group_id, promote_members_txn, group_id, actor, names)

    def leave(self, actor: str, group_id: str) -> Deferred[LeaveRecord]:
        """The owner's leaving passes ownership on; the last member's dissolves the group."""
        try:
            self._group(group_id)
        except GroupError as exc:
            return fail(exc)
        return self._change(group_id, leave_group_txn, group_id, actor, self._clock.seconds())

    def dissolve(self, actor: str, group_id: str) -> Deferred[list[str]]:
        """Owner only; fires with the former members, owner first, to tell them."""
        try:
            self._group(group_id)
        except GroupError as exc:
            return fail(exc)
        return self._change(group_id, dissolve_group_txn, group_id, actor, self._clock.seconds())

    # --- reads --------------------------------------------------------------------------

    def list_for(self, user: str) -> Deferred[list[GroupInfo]]:
        return self._db.run(groups_of_txn, user)

    def members(self, actor: str, group_id: str) -> Deferred[list[Member]]:
        """Members only; owner first, then admins, then members."""
        try:
            self._group(group_id)
        except GroupError as exc:
            return fail(exc)
        return self._db.run(group_members_txn, group_id, actor)

    def resolve(self, user: str, ref: str) -> Deferred[str]:
        """The group id ref means to user: an id as it is, or the name of one of their
        groups. Fails with GroupNotFound, or AmbiguousGroupName when several of their
        groups carry that name.
        """
        if not ref:
            return fail(BadGroupRequest("name a group (its id or its name)"))
        if len(ref) > max(GROUP_NAME_MAX, GROUP_ID_LENGTH):
            return fail(GroupNotFound(f"no such group: {ref[:80]!r}"))

        def one(ids: list[str]) -> str:
            if not ids:
                raise GroupNotFound(f"you are in no group named {ref!r}")
            if len(ids) > 1:
                raise AmbiguousGroupName(ref, ids)
            return ids[0]

        return self._db.run(find_groups_txn, user, ref).addCallback(one)

    # --- GROUP_R and the member cache ---------------------------------------------------

    def answer(self, actor: str, request: cim_pb2.GroupRequest) -> Deferred[cim_pb2.GroupAnswer]:
        """A GROUP_R frame answered (never fails: errors become the answer's error)."""
        return Deferred.fromCoroutine(answer(self, actor, request))

    def member_names(self, group_id: str) -> Deferred[list[str]]:
        """Sorted member names, for fan-out; from memory unless unknown or too old.

        An unknown or dissolved group has no members. Fires at once on a cache hit.
        """
        return self._members.of(group_id).addCallback(lambda entry: list(entry.names))

    def is_member(self, group_id: str, user: str) -> Deferred[bool]:
        """Whether user may post to the group; from the same cache as member_names."""
        return self._members.of(group_id).addCallback(lambda entry: user in entry.lookup)

    def forget(self, group_id: str) -> None:
        """Drop what is known of the group: the next question reads the database.

        A read already running when this is called still answers its callers, but its
        result is not kept, since it may predate the change that led here.
        """
        self._members.forget(group_id)


class _MemberCache:
    """Member lists by group, least recently used first out, each trusted for ``ttl``
    and read again in the background when asked for late in it (``cim.caching``)."""

    def __init__(self, db: Database, clock: IReactorTime, size: int, ttl: float | None) -> None:
        self._db = db
        self._clock = clock
        self._size = size
        self._ttl = ttl
        self._cache: OrderedDict[str, _Members] = OrderedDict()
        self._loading: dict[str, _Load] = {}

    def forget(self, group_id: str) -> None:
        self._cache.pop(group_id, None)
        self._loading.pop(group_id, None)

    def of(self, group_id: str) -> Deferred[_Members]:
        entry = self._cache.get(group_id)
        if entry is not None:
            ttl = self._ttl
            age = self._clock.seconds() - entry.loaded_at
            if ttl is None or age < ttl:
                self._cache.move_to_end(group_id)
                if ttl is not None and refresh_due(age, ttl) and group_id not in self._loading:
                    self._start_load(group_id, [])  # this list holds until the new one comes
                return succeed(entry)
            del self._cache[group_id]
        if not is_group_id(group_id):
            return succeed(_Members((), frozenset(), self._clock.seconds()))
        waiter: Deferred[_Members] = Deferred()
        load = self._loading.get(group_id)
        if load is not None:
            load.waiters.append(waiter)
            return waiter
        self._start_load(group_id, [waiter])
        return waiter

    def _start_load(self, group_id: str, waiters: list[Deferred[_Members]]) -> None:
        # The waiters are in place first: a read may answer at once.
        load = self._loading[group_id] = _Load(waiters)
        started = self._clock.seconds()
        d = self._db.run(member_names_txn, group_id)
        d.addBoth(self._loaded, group_id, load, started)

    def _loaded(
        self, result: list[str] | Failure, group_id: str, load: _Load, started: float
    ) -> None:
        current = self._loading.get(group_id) is load
        if current:
            del self._loading[group_id]
        if isinstance(result, Failure):
            for waiter in load.waiters:
                waiter.errback(result)
            return
        entry = _Members(tuple(result), frozenset(result), started)
        if current:
            self._cache[group_id] = entry
            self._cache.move_to_end(group_id)
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        for waiter in load.waiters:
            waiter.callback(entry)

"""Transactions on posts and their likes (``posts``, ``post_likes``).

A like is a row, and a post's count is ``COUNT(*)`` over its rows not withdrawn: there
is no counter column to drift from the truth when likes race. An unlike marks the row
withdrawn rather than deleting it, so a like given again is known not to be new.

Whether a like reached the post's goal is decided in the transaction that stores it,
against the post's row locked for the duration (``FOR UPDATE`` on PostgreSQL; SQLite
serialises writers anyway), and recorded by a conditional update of
``goal_reached_at``, so the goal is announced exactly once.

Visibility is decided here too, in the same transaction as the change it guards: a
post is seen by everyone (audience ``everyone``) or by its author and the accounts
sharing an active binding with the author (audience ``family``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from cim.storage.bindings import bound_accounts_txn, shares_binding_txn
from cim.storage.schema import post_likes, posts

EVERYONE = "everyone"
FAMILY = "family"


@dataclass(frozen=True)
class Post:
    id: int
    author: str
    text: str
    media_url: str | None
    audience: str
    like_goal: int | None
    goal_reached_at: float | None
    created_at: float
    likes: int
    liked_by_me: bool


class Refusal(Enum):
    """Why a call on one post was refused; the feature turns it into an HTTP answer."""

    NOT_VISIBLE = "not_visible"
    """No such post, or one the caller may not see: the two look the same."""
    NOT_AUTHOR = "not_author"
    OWN_POST = "own_post"


@dataclass(frozen=True)
class LikeOutcome:
    post: int
    author: str
    likes: int
    liked: bool
    added: bool
    """True only when this call made the like count (not for a repeat)."""
    first: bool
    """True only for the user's first like of the post, not one given again after an
    unlike: the author hears of each liker once, however often they change their mind."""
    removed: bool
    goal: int | None
    goal_reached_now: bool
    """True only in the one call whose like made the post reach its goal first."""


@dataclass(frozen=True)
class Likers:
    likes: int
    names: list[str]


_POST_COLUMNS = (
    posts.c.id,
    posts.c.author,
    posts.c.text,
    posts.c.media_url,
    posts.c.audience,
    posts.c.like_goal,
    posts.c.goal_reached_at,
    posts.c.created_at,
)


_COUNTED = post_likes.c.withdrawn_at.is_(None)
"""A like that has not been withdrawn."""


def _can_see(connection: Connection, row: Row, viewer: str) -> bool:
    if row.audience == EVERYONE or row.author == viewer:
        return True
    return shares_binding_txn(connection, row.author, viewer)


def _post_row(connection: Connection, post_id: int, *, lock: bool = False) -> Row | None:
    query = select(*_POST_COLUMNS).where(posts.c.id == post_id)
    if lock:
        query = query.with_for_update()
    return connection.execute(query).first()


def _visible_row(
    connection: Connection, post_id: int, viewer: str, *, lock: bool = False
) -> Row | Refusal:
    row = _post_row(connection, post_id, lock=lock)
    if row is None or not _can_see(connection, row, viewer):
        return Refusal.NOT_VISIBLE
    return row


def _like_count(connection: Connection, post_id: int) -> int:
    return int(
        connection.execute(
            select(func.count())
            .select_from(post_likes)
            .where(post_likes.c.post_id == post_id, _COUNTED)
        ).scalar_one()
    )


def _has_liked(connection: Connection, post_id: int, user: str) -> bool:
    row = connection.execute(
        select(post_likes.c.post_id).where(
            post_likes.c.post_id == post_id, post_likes.c.user_name == user, _COUNTED
        )
    ).first()
    return row is not None


def _posts_from_rows(connection: Connection, rows: Sequence[Row], viewer: str) -> list[Post]:
    ids = [int(row.id) for row in rows]
    counts: dict[int, int] = {}
    mine: set[int] = set()
    if ids:
        counted = connection.execute(
            select(post_likes.c.post_id, func.count())
            .where(post_likes.c.post_id.in_(ids), _COUNTED)
            .group_by(post_likes.c.post_id)
        )
        counts = {int(post_id): int(count) for post_id, count in counted}
        liked = connection.execute(
            select(post_likes.c.post_id).where(
                post_likes.c.post_id.in_(ids), post_likes.c.user_name == viewer, _COUNTED
            )
        )
        mine = {int(post_id) for post_id in liked.scalars()}
    return [
        Post(
            id=int(row.id),
            author=str(row.author),
            text=str(row.text),
            media_url=row.media_url,
            audience=str(row.audience),
            like_goal=row.like_goal,
            goal_reached_at=row.goal_reached_at,
            created_at=float(row.created_at),
            likes=counts.get(int(row.id), 0),
            liked_by_me=int(row.id) in mine,
        )
        for row in rows
    ]


# --- posts --------------------------------------------------------------------------------


def create_post_txn(
    connection: Connection,
    author: str,
    text: str,
    media_url: str | None,
    audience: str,
    like_goal: int | None,
    now: float,
) -> Post:
    result = connection.execute(
        insert(posts).values(
            author=author,
            text=text,
            media_url=media_url,
            audience=audience,
            like_goal=like_goal,
            created_at=now,
        )
    )
    key = result.inserted_primary_key
    assert key is not None
    row = _post_row(connection, int(key[0]))
    assert row is not None
    return _posts_from_rows(connection, [row], author)[0]


def visible_post_txn(connection: Connection, post_id: int, viewer: str) -> Post | None:
    """The post as ``viewer`` sees it, or None when it does not exist for them."""
    row = _visible_row(connection, post_id, viewer)
    if isinstance(row, Refusal):
        return None
    return _posts_from_rows(connection, [row], viewer)[0]


def visible_posts_txn(
    connection: Connection,
    viewer: str,
    author: str | None,
    before: int | None,
    limit: int,
) -> list[Post]:
    """The posts ``viewer`` may see, newest first, below the id ``before`` if given."""
    family = bound_accounts_txn(connection, viewer)
    seen: ColumnElement[bool] = or_(
        posts.c.audience == EVERYONE,
        posts.c.author == viewer,
        and_(posts.c.audience == FAMILY, posts.c.author.in_(family)),
    )
    query = select(*_POST_COLUMNS).where(seen)
    if author is not None:
        query = query.where(posts.c.author == author)
    if before is not None:
        query = query.where(posts.c.id < before)
    rows = connection.execute(query.order_by(posts.c.id.desc()).limit(limit)).all()
    return _posts_from_rows(connection, rows, viewer)


def delete_post_txn(connection: Connection, post_id: int, user: str) -> Refusal | None:
    """Delete the post if ``user`` wrote it; None when it is gone."""
    row = _visible_row(connection, post_id, user, lock=True)
    if isinstance(row, Refusal):
        return row
    if row.author != user:
        return Refusal.NOT_AUTHOR
    # The foreign key cascades too; deleting the likes first does not depend on it.
    connection.execute(delete(post_likes).where(post_likes.c.post_id == post_id))
    connection.execute(delete(posts).where(posts.c.id == post_id))
    return None


# --- likes --------------------------------------------------------------------------------


def like_post_txn(
    connection: Connection, post_id: int, user: str, now: float
) -> LikeOutcome | Refusal:
    """Like the post once, however often asked; detect the like that reaches the goal.

    The post's row is locked first, so concurrent likes of one post count one after
    another: each sees the likes committed before it, and exactly one of them sees the
    count reach the goal. The conditional update keeps that once-only even when likes
    are withdrawn and given again.
    """
    row = _visible_row(connection, post_id, user, lock=True)
    if isinstance(row, Refusal):
        return row
    if row.author == user:
        return Refusal.OWN_POST
    added = first = False
    try:
        # A savepoint: on PostgreSQL a failed insert would otherwise abort the whole
        # transaction, and a repeated like is not an error.
        with connection.begin_nested():
            connection.execute(
                insert(post_likes).values(post_id=post_id, user_name=user, created_at=now)
            )
        added = first = True
    except IntegrityError:
        given_again = connection.execute(
            update(post_likes)
            .where(
                post_likes.c.post_id == post_id,
                post_likes.c.user_name == user,
                post_likes.c.withdrawn_at.is_not(None),
            )
            .values(withdrawn_at=None, created_at=now)
        )
        added = given_again.rowcount == 1
        if not added and not _has_liked(connection, post_id, user):
            raise
    likes = _like_count(connection, post_id)
    goal = row.like_goal
    reached_now = False
    if goal is not None and likes >= goal and row.goal_reached_at is None:
        result = connection.execute(
            update(posts)
            .where(posts.c.id == post_id, posts.c.goal_reached_at.is_(None))
            .values(goal_reached_at=now)
        )
        reached_now = result.rowcount == 1
    return LikeOutcome(
        post=post_id,
        author=str(row.author),
        likes=likes,
        liked=True,
        added=added,
        first=first,
        removed=False,
        goal=goal,
        goal_reached_now=reached_now,
    )


def unlike_post_txn(
    connection: Connection, post_id: int, user: str, now: float
) -> LikeOutcome | Refusal:
    """Withdraw the like if there is one; not having liked is not an error."""
    row = _visible_row(connection, post_id, user, lock=True)
    if isinstance(row, Refusal):
        return row
    result = connection.execute(
        update(post_likes)
        .where(post_likes.c.post_id == post_id, post_likes.c.user_name == user, _COUNTED)
        .values(withdrawn_at=now)
    )
    return LikeOutcome(
        post=post_id,
        author=str(row.author),
        likes=_like_count(connection, post_id),
        liked=False,
        added=False,
        first=False,
        removed=result.rowcount > 0,
        goal=row.like_goal,
        goal_reached_now=False,
    )


def likers_txn(
    connection: Connection, post_id: int, viewer: str, limit: int, offset: int
) -> Likers | Refusal:
    """Who liked the post, earliest first, a page at a time."""
    row = _visible_row(connection, post_id, viewer)
    if isinstance(row, Refusal):
        return row
    names = connection.execute(
        select(post_likes.c.user_name)
        .where(post_likes.c.post_id == post_id, _COUNTED)
        .order_by(post_likes.c.created_at, post_likes.c.user_name)
        .limit(limit)
        .offset(offset)
    ).scalars()
    return Likers(_like_count(connection, post_id), [str(name) for name in names])

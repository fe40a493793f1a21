"""Posts that collect likes (集赞): publish, read, like, unlike, list the likers.

A post is seen by every user (audience ``everyone``) or only by its author and the
accounts sharing an active binding with the author (``family``). A post the caller
cannot see answers 404 exactly like one that does not exist, for reads and likes
alike, so its existence is not revealed; only deleting someone else's *visible* post
is a 403.

Authors are told of each new like and, once, of the like that reaches their goal.
Those notices follow the committed change; the decisions behind them (was this like
new, did it reach the goal first) are taken inside the transaction that stored it.
"""

from __future__ import annotations

from typing import Any, NoReturn

from cim.http.site import HttpError
from cim.logic.api import Answer, Call, Endpoint, array_of, is_media_url, object_schema
from cim.logic.context import LogicContext
from cim.storage.posts import (
    EVERYONE,
    LikeOutcome,
    Likers,
    Post,
    Refusal,
    create_post_txn,
    delete_post_txn,
    like_post_txn,
    likers_txn,
    unlike_post_txn,
    visible_post_txn,
    visible_posts_txn,
)
from cim.storage.schema import POST_AUDIENCES, URL_MAX

__all__ = ["MAX_LIKE_GOAL", "MAX_POST_TEXT", "PostApi", "post_json"]

MAX_POST_TEXT = 4000
MAX_LIKE_GOAL = 1_000_000
MAX_PAGE = 100
MAX_OFFSET = 1_000_000
"""Deep pages of likers are not a use case; a bound keeps OFFSET cheap."""

"""Checked again in full: a schema pattern's ``$`` also matches before a final newline."""
_POST_PARAM = {"post": {"type": "integer"}}
_POST_FIELDS: dict[str, dict[str, Any]] = {
    "text": {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_POST_TEXT,
        "pattern": r"\S",
        "description": "1 to 4000 characters, not only white space",
    },
    "media_url": {
        "type": "string",
        "maxLength": URL_MAX,
        "pattern": r"^https?://\S+$",
        "description": "an http(s) URL, e.g. a file service download URL",
    },
    "like_goal": {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_LIKE_GOAL,
        "description": "the author is told once when this many users have liked the post",
    },
    "audience": {
        "type": "string",
        "enum": list(POST_AUDIENCES),
        "description": "`everyone` (default) or `family`: the author and the accounts "
        "sharing an active binding with the author",
    },
}
POST_SCHEMA = object_schema(
    {
        "id": {"type": "integer"},
        "author": {"type": "string"},
        "text": {"type": "string"},
        "media_url": {"type": ["string", "null"]},
        "audience": {"type": "string", "enum": list(POST_AUDIENCES)},
        "like_goal": {"type": ["integer", "null"]},
        "likes": {"type": "integer"},
        "goal_reached": {"type": "boolean"},
        "created_at": {"type": "number"},
        "liked_by_me": {"type": "boolean"},
    },
    [
        "id",
        "author",
        "text",
        "media_url",
        "audience",
        "like_goal",
        "likes",
        "goal_reached",
        "created_at",
        "liked_by_me",
    ],
)
LIKE_SCHEMA = object_schema(
    {"post": {"type": "integer"}, "likes": {"type": "integer"}, "liked": {"type": "boolean"}},
    ["post", "likes", "liked"],
)


def post_json(post: Post) -> dict[str, Any]:
    return {
        "id": post.id,
        "author": post.author,
        "text": post.text,
        "media_url": post.media_url,
        "audience": post.audience,
        "like_goal": post.like_goal,
        "likes": post.likes,
        "goal_reached": post.goal_reached_at is not None,
        "created_at": post.created_at,
        "liked_by_me": post.liked_by_me,
    }


def _refuse(refusal: Refusal) -> NoReturn:
    if refusal is Refusal.NOT_AUTHOR:
        raise HttpError(403, "not_author", "only the post's author may do this")
    if refusal is Refusal.OWN_POST:
        raise HttpError(403, "own_post", "authors cannot like their own posts")
    raise HttpError(404, "not_found", "no such post")


class PostApi:
    def __init__(self, ctx: LogicContext) -> None:
        self.ctx = ctx

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint(
                "POST",
                "/posts",
                "create_post",
                "Publish a post, optionally with a like goal",
                "posts",
                self.create_post,
                body=object_schema(_POST_FIELDS, ["text"]),
                response=POST_SCHEMA,
                status=201,
            ),
            Endpoint(
                "GET",
                "/posts",
                "list_posts",
                "The posts the caller may see, newest first",
                "posts",
                self.list_posts,
                query={
                    "author": {"type": "string", "maxLength": 64},
                    "before": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
                    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                },
                response=object_schema({"posts": array_of(POST_SCHEMA, MAX_PAGE)}, ["posts"]),
                description=(
                    "`author` keeps one author's posts; `before` (a post id) pages back "
                    "through older posts; `limit` defaults to 20."
                ),
            ),
            Endpoint(
                "GET",
                "/posts/{post}",
                "get_post",
                "One post, with its like count",
                "posts",
                self.get_post,
                params=_POST_PARAM,
                response=POST_SCHEMA,
            ),
            Endpoint(
                "DELETE",
                "/posts/{post}",
                "delete_post",
                "Delete one of the caller's posts, with its likes",
                "posts",
                self.delete_post,
                params=_POST_PARAM,
                response=object_schema({"deleted": {"type": "integer"}}, ["deleted"]),
                errors=(403,),
            ),
            Endpoint(
                "PUT",
                "/posts/{post}/like",
                "like_post",
                "Like a post (liking it again changes nothing)",
                "posts",
                self.like_post,
                params=_POST_PARAM,
                response=LIKE_SCHEMA,
                errors=(403,),
                description="Authors cannot like their own posts (403 `own_post`).",
            ),
            Endpoint(
                "DELETE",
                "/posts/{post}/like",
                "unlike_post",
                "Withdraw a like (not having liked is fine)",
                "posts",
                self.unlike_post,
                params=_POST_PARAM,
                response=LIKE_SCHEMA,
            ),
            Endpoint(
                "GET",
                "/posts/{post}/likes",
                "list_likers",
                "How many liked the post, and who, earliest first",
                "posts",
                self.list_likers,
                params=_POST_PARAM,
                query={
                    "limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                    "offset": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
                },
                response=object_schema(
                    {
                        "likes": {"type": "integer"},
                        "likers": array_of({"type": "string"}, MAX_PAGE),
                    },
                    ["likes", "likers"],
                ),
                description="`limit` defaults to 50.",
            ),
        ]

    # --- posts ----------------------------------------------------------------------------

    async def create_post(self, call: Call) -> Answer:
        body = call.body
        media_url = body.get("media_url")
        if media_url is not None and not is_media_url(str(media_url)):
            raise HttpError(400, "bad_request", "body.media_url: expected an http(s) URL")
        like_goal = body.get("like_goal")
        post = await self.ctx.database.run(
            create_post_txn,
            call.user.user,
            str(body["text"]),
            None if media_url is None else str(media_url),
            str(body.get("audience", EVERYONE)),
            None if like_goal is None else int(like_goal),
            self.ctx.now(),
        )
        return 201, post_json(post)

    async def list_posts(self, call: Call) -> Answer:
        author = call.query.get("author")
        before = call.query.get("before")
        found = await self.ctx.database.run(
            visible_posts_txn,
            call.user.user,
            None if author is None else str(author),
            None if before is None else int(before),
            int(call.query.get("limit", 20)),
        )
        return 200, {"posts": [post_json(post) for post in found]}

    async def get_post(self, call: Call) -> Answer:
        post = await self.ctx.database.run(
            visible_post_txn, int(call.params["post"]), call.user.user
        )
        if post is None:
            _refuse(Refusal.NOT_VISIBLE)
        return 200, post_json(post)

    async def delete_post(self, call: Call) -> Answer:
        post_id = int(call.params["post"])
        refusal = await self.ctx.database.run(delete_post_txn, post_id, call.user.user)
        if refusal is not None:
            _refuse(refusal)
        return 200, {"deleted": post_id}

    # --- likes ----------------------------------------------------------------------------

    async def like_post(self, call: Call) -> Answer:
        user = call.user.user
        outcome = await self.ctx.database.run(
            like_post_txn, int(call.params["post"]), user, self.ctx.now()
        )
        if isinstance(outcome, Refusal):
            _refuse(outcome)
        if outcome.first:
            await self.ctx.notices.send(
                [outcome.author], "post.liked", post=outcome.post, by=user, likes=outcome.likes
            )
        if outcome.goal_reached_now:
            await self.ctx.notices.send(
                [outcome.author],
                "post.goal_reached",
                post=outcome.post,
                likes=outcome.likes,
                goal=outcome.goal,
            )
        return 200, _like_json(outcome)

    async def unlike_post(self, call: Call) -> Answer:
        outcome = await self.ctx.database.run(
            unlike_post_txn, int(call.params["post"]), call.user.user, self.ctx.now()
        )
        if isinstance(outcome, Refusal):
            _refuse(outcome)
        return 200, _like_json(outcome)

    async def list_likers(self, call: Call) -> Answer:
        found: Likers | Refusal = await self.ctx.database.run(
            likers_txn,
            int(call.params["post"]),
            call.user.user,
            int(call.query.get("limit", 50)),
            int(call.query.get("offset", 0)),
        )
        if isinstance(found, Refusal):
            _refuse(found)
        return 200, {"likes": found.likes, "likers": found.names}


def _like_json(outcome: LikeOutcome) -> dict[str, Any]:
    return {"post": outcome.post, "likes": outcome.likes, "liked": outcome.liked}

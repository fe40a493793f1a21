"""Posts over HTTP: publish, read and page through posts, like, unlike, list likers."""

from __future__ import annotations

from typing import Any

from cim.http.schema import TIMESTAMP, listing_of, object_schema
from cim.http.site import Reply
from cim.json_convention import iso_time, listing, present
from cim.logic.http.api import LogicCall, LogicEndpoint, answer
from cim.logic.posts import Posts
from cim.storage.posts import EVERYONE, LikeOutcome, Post
from cim.storage.schema import POST_AUDIENCES, URL_MAX

__all__ = ["MAX_LIKE_GOAL", "MAX_POST_TEXT", "post_endpoints", "post_json"]

MAX_POST_TEXT = 4000
MAX_LIKE_GOAL = 1_000_000
MAX_PAGE = 100
MAX_OFFSET = 1_000_000
"""Deep pages of likers are not a use case; a bound keeps OFFSET cheap."""
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
        "description": "an https URL, or a URL of this node's file service",
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
        "media_url": {"type": "string", "description": "left out when the post has none"},
        "audience": {"type": "string", "enum": list(POST_AUDIENCES)},
        "like_goal": {"type": "integer", "description": "left out when the post has none"},
        "likes": {"type": "integer"},
        "goal_reached": {"type": "boolean"},
        "created_at": TIMESTAMP,
        "liked_by_me": {"type": "boolean"},
    },
    ["id", "author", "text", "audience", "likes", "goal_reached", "created_at", "liked_by_me"],
)
LIKE_SCHEMA = object_schema(
    {"post": {"type": "integer"}, "likes": {"type": "integer"}, "liked": {"type": "boolean"}},
    ["post", "likes", "liked"],
)


def post_json(post: Post) -> dict[str, Any]:
    return present(
        {
            "id": post.id,
            "author": post.author,
            "text": post.text,
            "media_url": post.media_url,
            "audience": post.audience,
            "like_goal": post.like_goal,
            "likes": post.likes,
            "goal_reached": post.goal_reached_at is not None,
            "created_at": iso_time(post.created_at),
            "liked_by_me": post.liked_by_me,
        }
    )


def post_endpoints(posts: Posts) -> list[LogicEndpoint]:
    async def create_post(call: LogicCall) -> Reply:
        body = call.body
        media_url = body.get("media_url")
        like_goal = body.get("like_goal")
        post = await posts.create_post(
            call.user.user,
            str(body["text"]),
            None if media_url is None else str(media_url),
            str(body.get("audience", EVERYONE)),
            None if like_goal is None else int(like_goal),
        )
        return answer(201, post_json(post))

    async def list_posts(call: LogicCall) -> Reply:
        author = call.query.get("author")
        before = call.query.get("before")
        found = await posts.visible_posts(
            call.user.user,
            None if author is None else str(author),
            None if before is None else int(before),
            int(call.query.get("limit", 20)),
        )
        return answer(200, listing([post_json(post) for post in found]))

    async def get_post(call: LogicCall) -> Reply:
        return answer(200, post_json(await posts.post(call.user.user, int(call.params["post"]))))

    async def delete_post(call: LogicCall) -> Reply:
        post_id = int(call.params["post"])
        await posts.delete_post(call.user.user, post_id)
        return answer(200, {"deleted": post_id})

    async def like_post(call: LogicCall) -> Reply:
        outcome = await posts.like(call.user.user, int(call.params["post"]))
        return answer(200, _like_json(outcome))

    async def unlike_post(call: LogicCall) -> Reply:
        outcome = await posts.unlike(call.user.user, int(call.params["post"]))
        return answer(200, _like_json(outcome))

    async def list_likers(call: LogicCall) -> Reply:
        found = await posts.likers(
            call.user.user,
            int(call.params["post"]),
            int(call.query.get("limit", 50)),
            int(call.query.get("offset", 0)),
        )
        return answer(200, listing(found.names, likes=found.likes))

    return [
        LogicEndpoint(
            "POST",
            "/posts",
            "create_post",
            "Publish a post, optionally with a like goal",
            "posts",
            create_post,
            body=object_schema(_POST_FIELDS, ["text"]),
            response=POST_SCHEMA,
            status=201,
        ),
        LogicEndpoint(
            "GET",
            "/posts",
            "list_posts",
            "The posts the caller may see, newest first",
            "posts",
            list_posts,
            query={
                "author": {"type": "string", "maxLength": 64},
                "before": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
                "limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
            },
            response=listing_of(POST_SCHEMA, MAX_PAGE),
            description=(
                "`author` keeps one author's posts; `before` (a post id) pages back "
                "through older posts; `limit` defaults to 20."
            ),
        ),
        LogicEndpoint(
            "GET",
            "/posts/{post}",
            "get_post",
            "One post, with its like count",
            "posts",
            get_post,
            params=_POST_PARAM,
            response=POST_SCHEMA,
        ),
        LogicEndpoint(
            "DELETE",
            "/posts/{post}",
            "delete_post",
            "Delete one of the caller's posts, with its likes",
            "posts",
            delete_post,
            params=_POST_PARAM,
            response=object_schema({"deleted": {"type": "integer"}}, ["deleted"]),
            errors=(403,),
        ),
        LogicEndpoint(
            "PUT",
            "/posts/{post}/like",
            "like_post",
            "Like a post (liking it again changes nothing)",
            "posts",
            like_post,
            params=_POST_PARAM,
            response=LIKE_SCHEMA,
            errors=(403,),
            description="Authors cannot like their own posts (403 `own_post`).",
        ),
        LogicEndpoint(
            "DELETE",
            "/posts/{post}/like",
            "unlike_post",
            "Withdraw a like (not having liked is fine)",
            "posts",
            unlike_post,
            params=_POST_PARAM,
            response=LIKE_SCHEMA,
        ),
        LogicEndpoint(
            "GET",
            "/posts/{post}/likes",
            "list_likers",
            "How many liked the post, and who, earliest first",
            "posts",
            list_likers,
            params=_POST_PARAM,
            query={
                "limit": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                "offset": {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
            },
            response=listing_of({"type": "string"}, MAX_PAGE, {"likes": {"type": "integer"}}),
            description="`items` names the likers of this page, `likes` counts them all; "
            "`limit` defaults to 50.",
        ),
    ]


def _like_json(outcome: LikeOutcome) -> dict[str, Any]:
    return {"post": outcome.post, "likes": outcome.likes, "liked": outcome.liked}

"""Posts that collect likes (集赞): publish, read, like, unlike, list the likers.

A post is seen by every user (audience ``everyone``) or only by its author and the
accounts sharing an active binding with the author (``family``). A post the caller
cannot see is refused exactly like one that does not exist, for reads and likes
alike, so its existence is not revealed; only deleting someone else's *visible* post
is forbidden.

Authors are told of each new like and, once, of the like that reaches their goal.
Those notices follow the committed change; the decisions behind them (was this like
new, did it reach the goal first) are taken inside the transaction that stored it.
"""

from __future__ import annotations

from typing import NoReturn

from cim.limits.policy import POSTS
from cim.logic.context import LogicContext
from cim.logic.errors import BadInput, Forbidden, NotFound, TooManyAttempts
from cim.storage.posts import (
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

__all__ = ["Posts"]


def _refuse(refusal: Refusal) -> NoReturn:
    if refusal is Refusal.NOT_AUTHOR:
        raise Forbidden("not_author", "only the post's author may do this")
    if refusal is Refusal.OWN_POST:
        raise Forbidden("own_post", "authors cannot like their own posts")
    raise NotFound("not_found", "no such post")


class Posts:
    def __init__(self, ctx: LogicContext) -> None:
        self.ctx = ctx

    # --- posts ----------------------------------------------------------------------------

    async def create_post(
        self,
        author: str,
        text: str,
        media_url: str | None,
        audience: str,
        like_goal: int | None,
    ) -> Post:
        if media_url is not None and not self.ctx.media_urls.accepts(media_url):
            # Checked again in full: a schema pattern's ``$`` also matches before a
            # final newline.
            raise BadInput(
                "bad_request", "body.media_url: expected an https URL, or this node's file URL"
            )
        # Every post is seen by everyone (or the family): an author gets [limits] posts.
        wait = self.ctx.limits.take(POSTS, author)
        if wait > 0:
            raise TooManyAttempts("rate_limited", "too many posts; try again later", wait)
        return await self.ctx.database.run(
            create_post_txn, author, text, media_url, audience, like_goal, self.ctx.now()
        )

    async def visible_posts(
        self, reader: str, author: str | None, before: int | None, limit: int
    ) -> list[Post]:
        """The posts ``reader`` may see, newest first, older than post ``before``."""
        return list(await self.ctx.database.run(visible_posts_txn, reader, author, before, limit))

    async def post(self, reader: str, post_id: int) -> Post:
        post = await self.ctx.database.run(visible_post_txn, post_id, reader)
        if post is None:
            _refuse(Refusal.NOT_VISIBLE)
        return post

    async def delete_post(self, user: str, post_id: int) -> None:
        refusal = await self.ctx.database.run(delete_post_txn, post_id, user)
        if refusal is not None:
            _refuse(refusal)

    # --- likes ----------------------------------------------------------------------------

    async def like(self, user: str, post_id: int) -> LikeOutcome:
        """Like once; the author hears of a first like and of the goal reached."""
        outcome = await self.ctx.database.run(like_post_txn, post_id, user, self.ctx.now())
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
        return outcome

    async def unlike(self, user: str, post_id: int) -> LikeOutcome:
        outcome = await self.ctx.database.run(unlike_post_txn, post_id, user, self.ctx.now())
        if isinstance(outcome, Refusal):
            _refuse(outcome)
        return outcome

    async def likers(self, reader: str, post_id: int, limit: int, offset: int) -> Likers:
        found: Likers | Refusal = await self.ctx.database.run(
            likers_txn, post_id, reader, limit, offset
        )
        if isinstance(found, Refusal):
            _refuse(found)
        return found

"""Posts and likes (集赞) over the logic service's HTTP API."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.engine import Connection
from twisted.trial.unittest import SynchronousTestCase

from cim.storage.posts import like_post_txn
from cim.storage.schema import bindings, post_likes, posts
from tests.fakes.logic import PASSWORD, LogicHarness, fired


def bind(h: LogicHarness, device: str, guardian: str) -> None:
    def insert(connection: Connection) -> None:
        connection.execute(
            bindings.insert().values(
                device=device, guardian=guardian, status="active", created_at=1.0
            )
        )

    fired(h.db.run(insert))


def unbind(h: LogicHarness, device: str, guardian: str) -> None:
    def remove(connection: Connection) -> None:
        connection.execute(
            delete(bindings).where(bindings.c.device == device, bindings.c.guardian == guardian)
        )

    fired(h.db.run(remove))


def publish(h: LogicHarness, author: str, **fields: Any) -> dict[str, Any]:
    status, post = h.call("POST", "/posts", author, {"text": "hello", **fields})
    assert status == 201, (status, post)
    return post


class LikeGoalTests(SynchronousTestCase):
    def test_a_double_like_counts_once_and_the_goal_is_announced_once(self) -> None:
        """A post with a goal of 3 likes: a double like counts once; the author is
        notified when the third like arrives, once."""
        h = LogicHarness(self)
        for name in ("author", "u1", "u2", "u3"):
            h.add_user(name)
        h.connect("author")
        post = publish(h, "author", text="help me win a prize", like_goal=3)
        self.assertEqual((post["likes"], post["goal_reached"]), (0, False))
        path = f"/posts/{post['id']}/like"

        for _ in range(2):
            status, body = h.call("PUT", path, "u1")
            self.assertEqual((status, body), (200, {"post": post["id"], "likes": 1, "liked": True}))
        liked = h.notices("author", "post.liked")
        self.assertEqual([(n["post"], n["by"], n["likes"]) for n in liked], [(post["id"], "u1", 1)])
        self.assertEqual(h.notices("author", "post.goal_reached"), [])

        self.assertEqual(h.call("PUT", path, "u2")[1]["likes"], 2)
        self.assertEqual(h.notices("author", "post.goal_reached"), [])
        self.assertEqual(h.call("PUT", path, "u3")[1]["likes"], 3)
        [goal] = h.notices("author", "post.goal_reached")
        self.assertEqual((goal["post"], goal["likes"], goal["goal"]), (post["id"], 3, 3))
        self.assertEqual(goal["priority"], "normal")

        status, body = h.call("DELETE", path, "u3")
        self.assertEqual((status, body["likes"], body["liked"]), (200, 2, False))
        self.assertEqual(h.call("PUT", path, "u3")[1]["likes"], 3)
        self.assertEqual(len(h.notices("author", "post.goal_reached")), 1)
        # A like given again after an unlike is not news to the author.
        self.assertEqual([n["by"] for n in h.notices("author", "post.liked")], ["u1", "u2", "u3"])

        status, body = h.call("GET", f"/posts/{post['id']}", "u1")
        self.assertEqual(
            (body["likes"], body["goal_reached"], body["liked_by_me"]), (3, True, True)
        )
        status, body = h.call("GET", f"/posts/{post['id']}/likes", "author")
        self.assertEqual((status, body), (200, {"items": ["u1", "u2", "u3"], "likes": 3}))

    def test_an_offline_author_gets_the_notices_at_next_login(self) -> None:
        h = LogicHarness(self)
        h.add_user("author")
        h.add_user("fan")
        post = publish(h, "author", like_goal=1)
        h.call("PUT", f"/posts/{post['id']}/like", "fan")
        h.connect("author")
        self.assertEqual(len(h.notices("author", "post.liked")), 1)
        self.assertEqual(len(h.notices("author", "post.goal_reached")), 1)

    def test_the_goal_is_decided_in_the_transaction_even_when_reached_again(self) -> None:
        """Storage level: only the like that first reaches the goal says so."""
        h = LogicHarness(self)
        for name in ("author", "u1", "u2"):
            h.add_user(name)
        post = publish(h, "author", like_goal=1)
        first = fired(h.db.run(like_post_txn, post["id"], "u1", 10.0))
        second = fired(h.db.run(like_post_txn, post["id"], "u2", 11.0))
        again = fired(h.db.run(like_post_txn, post["id"], "u1", 12.0))
        self.assertEqual(
            [(o.added, o.goal_reached_now, o.likes) for o in (first, second, again)],
            [(True, True, 1), (True, False, 2), (False, False, 2)],
        )

        def reached_at(connection: Connection) -> Any:
            return connection.execute(
                select(posts.c.goal_reached_at).where(posts.c.id == post["id"])
            ).scalar_one()

        self.assertEqual(fired(h.db.run(reached_at)), 10.0)

    def test_liking_again_after_an_unlike_does_not_tell_the_author_again(self) -> None:
        h = LogicHarness(self)
        for name in ("author", "fan"):
            h.add_user(name)
        h.connect("author")
        post = publish(h, "author")
        path = f"/posts/{post['id']}/like"
        for _ in range(3):
            self.assertEqual(
                h.call("PUT", path, "fan")[1], {"post": post["id"], "likes": 1, "liked": True}
            )
            self.assertEqual(h.call("DELETE", path, "fan")[1]["likes"], 0)
        self.assertEqual(h.call("PUT", path, "fan")[1]["likes"], 1)
        self.assertEqual(len(h.notices("author", "post.liked")), 1)
        status, likers = h.call("GET", f"/posts/{post['id']}/likes", "author")
        self.assertEqual((status, likers), (200, {"items": ["fan"], "likes": 1}))
        h.call("DELETE", path, "fan")
        status, got = h.call("GET", f"/posts/{post['id']}", "fan")
        self.assertEqual((got["likes"], got["liked_by_me"]), (0, False))
        self.assertEqual(h.call("GET", f"/posts/{post['id']}/likes", "author")[1]["items"], [])

    def test_a_post_without_a_goal_never_announces_one(self) -> None:
        h = LogicHarness(self)
        h.add_user("author")
        h.add_user("fan")
        h.connect("author")
        post = publish(h, "author")
        h.call("PUT", f"/posts/{post['id']}/like", "fan")
        self.assertEqual(h.notices("author", "post.goal_reached"), [])
        self.assertEqual(len(h.notices("author", "post.liked")), 1)


class LikeRuleTests(SynchronousTestCase):
    def test_unliking_without_a_like_is_fine(self) -> None:
        h = LogicHarness(self)
        h.add_user("author")
        h.add_user("fan")
        post = publish(h, "author")
        status, body = h.call("DELETE", f"/posts/{post['id']}/like", "fan")
        self.assertEqual((status, body), (200, {"post": post["id"], "likes": 0, "liked": False}))

    def test_authors_cannot_like_their_own_posts(self) -> None:
        h = LogicHarness(self)
        h.add_user("author")
        h.connect("author")
        post = publish(h, "author", like_goal=1)
        status, body = h.call("PUT", f"/posts/{post['id']}/like", "author")
        self.assertEqual((status, body["error"]), (403, "own_post"))
        self.assertEqual(h.notices("author"), [])
        self.assertEqual(h.call("DELETE", f"/posts/{post['id']}/like", "author")[0], 200)

    def test_likers_are_paged(self) -> None:
        h = LogicHarness(self)
        h.add_user("author")
        post = publish(h, "author")
        for index in range(5):
            name = f"fan{index}"
            h.add_user(name)
            h.clock.advance(1)
            h.call("PUT", f"/posts/{post['id']}/like", name)
        status, body = h.call("GET", f"/posts/{post['id']}/likes?limit=2&offset=2", "author")
        self.assertEqual((status, body), (200, {"items": ["fan2", "fan3"], "likes": 5}))
        status, body = h.call("GET", f"/posts/{post['id']}/likes?limit=1000", "author")
        self.assertEqual((status, body["error"]), (400, "bad_request"))

    def test_deleting_an_account_takes_its_likes_and_posts(self) -> None:
        h = LogicHarness(self)
        h.add_user("author")
        h.add_user("fan")
        post = publish(h, "author")
        publish(h, "fan")
        h.call("PUT", f"/posts/{post['id']}/like", "fan")
        self.assertEqual(h.call("DELETE", "/me", "fan", {"password": PASSWORD})[0], 200)
        status, body = h.call("GET", f"/posts/{post['id']}/likes", "author")
        self.assertEqual((status, body), (200, {"items": [], "likes": 0}))
        self.assertEqual(
            [p["id"] for p in h.call("GET", "/posts", "author")[1]["items"]], [post["id"]]
        )


class PostTests(SynchronousTestCase):
    def test_publish_read_and_list_newest_first(self) -> None:
        h = LogicHarness(self)
        h.add_user("ann")
        h.add_user("ben")
        first = publish(h, "ann", text="one", media_url="https://files.example/f/1")
        self.assertEqual(
            {k: first.get(k) for k in ("author", "text", "media_url", "audience", "like_goal")},
            {
                "author": "ann",
                "text": "one",
                "media_url": "https://files.example/f/1",
                "audience": "everyone",
                "like_goal": None,
            },
        )
        self.assertNotIn("like_goal", first)  # left out, not null
        second = publish(h, "ben", text="two")
        third = publish(h, "ann", text="three")
        status, body = h.call("GET", "/posts", "ben")
        self.assertEqual(
            (status, [p["id"] for p in body["items"]]),
            (200, [third["id"], second["id"], first["id"]]),
        )
        status, body = h.call("GET", "/posts?author=ann&limit=1", "ben")
        self.assertEqual([p["id"] for p in body["items"]], [third["id"]])
        status, body = h.call("GET", f"/posts?author=ann&before={third['id']}", "ben")
        self.assertEqual([p["id"] for p in body["items"]], [first["id"]])
        status, body = h.call("GET", f"/posts/{second['id']}", "ann")
        self.assertEqual((status, body["text"], body["liked_by_me"]), (200, "two", False))

    def test_bad_input_is_a_400(self) -> None:
        h = LogicHarness(self)
        h.add_user("ann")
        for body in (
            {"text": ""},
            {"text": "   "},
            {"text": "x" * 4001},
            {"text": "hi", "media_url": "ftp://files.example/f"},
            {"text": "hi", "media_url": "javascript:alert(1)"},
            {"text": "hi", "media_url": "https://files.example/f\n"},
            {"text": "hi", "media_url": "https://files.example/a b"},
            {"text": "hi", "media_url": "http://["},
            {"text": "hi", "media_url": "https://files.example:99999/f"},
            {"text": "hi", "media_url": "https:///f"},
            {"text": "hi", "media_url": "https://" + "a" * 3000},
            {"text": "hi", "like_goal": 0},
            {"text": "hi", "like_goal": 1_000_001},
            {"text": "hi", "like_goal": 2.5},
            {"text": "hi", "audience": "friends"},
            {"text": "hi", "author": "ben"},
        ):
            status, answer = h.call("POST", "/posts", "ann", body)
            self.assertEqual((status, answer["error"]), (400, "bad_request"), body)
        for query in ("limit=0", "limit=101", "before=0", "before=x", "author=" + "a" * 65):
            status, answer = h.call("GET", f"/posts?{query}", "ann")
            self.assertEqual(status, 400, query)
        self.assertEqual(h.call("GET", "/posts/99999999999999999999", "ann")[0], 404)
        self.assertEqual(h.call("PUT", "/posts/12/like", "ann")[0], 404)

    def test_only_the_author_deletes_and_the_likes_go_too(self) -> None:
        h = LogicHarness(self)
        h.add_user("ann")
        h.add_user("ben")
        post = publish(h, "ann")
        h.call("PUT", f"/posts/{post['id']}/like", "ben")
        status, body = h.call("DELETE", f"/posts/{post['id']}", "ben")
        self.assertEqual((status, body["error"]), (403, "not_author"))
        status, body = h.call("DELETE", f"/posts/{post['id']}", "ann")
        self.assertEqual((status, body), (200, {"deleted": post["id"]}))
        self.assertEqual(h.call("GET", f"/posts/{post['id']}", "ann")[0], 404)
        self.assertEqual(h.call("DELETE", f"/posts/{post['id']}", "ann")[0], 404)

        def count(connection: Connection) -> int:
            return int(
                connection.execute(select(func.count()).select_from(post_likes)).scalar_one()
            )

        self.assertEqual(fired(h.db.run(count)), 0)

    def test_unauthenticated_calls_are_401(self) -> None:
        h = LogicHarness(self)
        self.assertEqual(h.call("GET", "/posts")[0], 401)
        self.assertEqual(h.call("POST", "/posts", body={"text": "hi"})[0], 401)


class FamilyAudienceTests(SynchronousTestCase):
    def setUp(self) -> None:
        h = self.h = LogicHarness(self)
        h.add_user("mum")
        h.add_user("watch", kind="device")
        h.add_user("stranger")
        bind(h, "watch", "mum")
        self.post = publish(h, "watch", text="at school", audience="family", like_goal=5)
        self.path = f"/posts/{self.post['id']}"

    def test_bound_accounts_see_and_like_a_family_post(self) -> None:
        h = self.h
        self.assertEqual(h.call("GET", self.path, "mum")[0], 200)
        self.assertEqual(h.call("PUT", self.path + "/like", "mum")[1]["likes"], 1)
        body = h.call("GET", "/posts", "mum")[1]
        self.assertEqual([p["id"] for p in body["items"]], [self.post["id"]])

    def test_an_unbound_user_gets_404_for_every_call(self) -> None:
        h = self.h
        for method, suffix in (
            ("GET", ""),
            ("PUT", "/like"),
            ("DELETE", "/like"),
            ("GET", "/likes"),
            ("DELETE", ""),
        ):
            status, body = h.call(method, self.path + suffix, "stranger")
            self.assertEqual((status, body["error"]), (404, "not_found"), (method, suffix))
        self.assertEqual(h.call("GET", "/posts", "stranger")[1], {"items": []})
        self.assertEqual(h.call("GET", "/posts?author=watch", "stranger")[1], {"items": []})

    def test_an_unbound_guardian_loses_sight_at_once_and_their_like_stays(self) -> None:
        h = self.h
        h.call("PUT", self.path + "/like", "mum")
        unbind(h, "watch", "mum")
        for method, suffix in (("GET", ""), ("PUT", "/like"), ("DELETE", "/like")):
            status, _ = h.call(method, self.path + suffix, "mum")
            self.assertEqual(status, 404, (method, suffix))
        self.assertEqual(h.call("GET", "/posts", "mum")[1], {"items": []})
        status, body = h.call("GET", self.path + "/likes", "watch")
        self.assertEqual((status, body), (200, {"items": ["mum"], "likes": 1}))

    def test_a_pending_binding_does_not_show_family_posts(self) -> None:
        h = self.h
        h.add_user("dad")

        def request(connection: Connection) -> None:
            connection.execute(
                bindings.insert().values(
                    device="watch", guardian="dad", status="pending", created_at=2.0
                )
            )

        fired(h.db.run(request))
        self.assertEqual(h.call("GET", self.path, "dad")[0], 404)

    def test_everyone_posts_stay_visible_to_strangers(self) -> None:
        h = self.h
        public = publish(h, "watch", text="open")
        body = h.call("GET", "/posts?author=watch", "stranger")[1]
        self.assertEqual([p["id"] for p in body["items"]], [public["id"]])
        body = h.call("GET", "/posts?author=watch", "mum")[1]
        self.assertEqual([p["id"] for p in body["items"]], [public["id"], self.post["id"]])

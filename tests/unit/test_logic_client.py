"""The logic service's client library and cim-client's logic subcommands.

The client runs against the real logic resource in memory (``LogicHarness``, treq's
StubTreq): registration, posts and likes go all the way to SQLite and back. Every
subcommand's arguments are parsed and dispatched to a recording stand-in, so the
calls for features tested elsewhere are checked without depending on them here.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from cim.client.logic import AccountCalls, LogicClient, LogicError, PostCalls, SafetyCalls
from cim.json_convention import iso_time
from cim.scripts import client as cli
from cim.scripts import login
from tests.fakes.logic import PASSWORD, LogicHarness, fired


def settle(h: LogicHarness, work: Coroutine[Any, Any, Any]) -> Any:
    d: Deferred[Any] = Deferred.fromCoroutine(work)
    for _ in range(10):
        if d.called:
            break
        h.flush()
    h.flush()  # what the answer set off: notices reaching IM clients
    return fired(d)


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["--user", "ann", *argv])


class LogicClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = LogicHarness(self)

    def api(self, user: str | None = None) -> LogicClient:
        token = None if user is None else self.h.token(user)
        return LogicClient(None, "http://logic.invalid/", token, http=self.h.http)

    def test_register_post_like_and_list_the_likers(self) -> None:
        h = self.h
        profile = settle(h, self.api().register("ann", PASSWORD, display_name="Ann"))
        self.assertEqual((profile["name"], profile["display_name"]), ("ann", "Ann"))
        h.node.users.names.add("ann")
        h.add_user("ben")
        h.connect("ann")
        post = settle(h, self.api("ann").create_post("vote for me", like_goal=1))
        self.assertEqual((post["author"], post["like_goal"], post["likes"]), ("ann", 1, 0))

        ben = self.api("ben")
        liked = settle(h, ben.like(post["id"]))
        self.assertEqual(liked, {"post": post["id"], "likes": 1, "liked": True})
        self.assertEqual(settle(h, ben.like(post["id"]))["likes"], 1)
        self.assertEqual(len(h.notices("ann", "post.goal_reached")), 1)
        self.assertEqual(
            settle(h, ben.likers(post["id"], limit=10)), {"items": ["ben"], "likes": 1}
        )
        [listed] = settle(h, ben.posts(author="ann", limit=5))["items"]
        self.assertEqual((listed["id"], listed["liked_by_me"]), (post["id"], True))
        self.assertEqual(settle(h, ben.unlike(post["id"]))["liked"], False)
        self.assertEqual(settle(h, ben.post(post["id"]))["likes"], 0)
        self.assertEqual(
            settle(h, self.api("ann").delete_post(post["id"])), {"deleted": post["id"]}
        )

    def test_refusals_carry_the_service_error_code(self) -> None:
        h = self.h
        h.add_user("ann")
        ann = self.api("ann")
        post = settle(h, ann.create_post("mine"))
        with self.assertRaises(LogicError) as own:
            settle(h, ann.like(post["id"]))
        self.assertEqual((own.exception.status, own.exception.code), (403, "own_post"))
        with self.assertRaises(LogicError) as missing:
            settle(h, ann.post(post["id"] + 1))
        self.assertEqual((missing.exception.status, missing.exception.code), (404, "not_found"))
        with self.assertRaises(LogicError) as bad:
            settle(h, ann.create_post("x", media_url="file:///etc/passwd"))
        self.assertEqual((bad.exception.status, bad.exception.code), (400, "bad_request"))
        with self.assertRaises(LogicError) as anonymous:
            settle(h, self.api().posts())
        self.assertEqual(anonymous.exception.status, 401)
        self.assertIn("HTTP 401", str(anonymous.exception))

    def test_each_family_of_calls_works_alone(self) -> None:
        h = self.h
        h.add_user("ann")
        h.add_user("watch", kind="device")
        token = h.token("ann")
        posts = PostCalls(None, "http://logic.invalid", token, http=h.http)  # type: ignore[arg-type]
        post = settle(h, posts.create_post("alone"))
        self.assertEqual(settle(h, posts.post(post["id"]))["text"], "alone")
        accounts = AccountCalls(None, "http://logic.invalid", token, http=h.http)  # type: ignore[arg-type]
        self.assertEqual(settle(h, accounts.me())["name"], "ann")
        safety = SafetyCalls(None, "http://logic.invalid", token, http=h.http)  # type: ignore[arg-type]
        with self.assertRaises(LogicError) as refused:  # ann is no guardian of the watch
            settle(h, safety.fences("watch"))
        self.assertEqual(refused.exception.status // 100, 4)
        self.assertEqual(repr(posts), "PostCalls('http://logic.invalid')")
        self.assertNotIn(token, repr(posts))

    def test_the_base_url_may_name_the_api_root(self) -> None:
        api = LogicClient(None, "http://logic.invalid/api/v1/", None, http=self.h.http)
        self.assertEqual(api.base_url, "http://logic.invalid")

    def test_names_in_paths_are_one_segment(self) -> None:
        h = self.h
        h.add_user("ann")
        with self.assertRaises(LogicError) as refused:
            settle(h, self.api("ann").fences("../posts"))
        self.assertEqual(refused.exception.status, 404)

    def test_bindings_sos_fences_and_positions(self) -> None:
        """The calls of the other features, as the agreed API has them."""
        h = self.h
        h.add_user("ann")
        h.add_user("watch", kind="device")
        watch, ann = self.api("watch"), self.api("ann")
        code = settle(h, watch.binding_code())["code"]
        bound = settle(h, ann.bind("watch", code))
        self.assertEqual((bound["device"], bound["status"]), ("watch", "active"))
        [binding] = settle(h, ann.bindings())["items"]
        self.assertEqual(binding["guardian"], "ann")

        event = settle(h, watch.raise_sos(1.0, 2.0, accuracy_m=5.0, battery=30))
        self.assertEqual(event["notified"], ["ann"])
        events = settle(h, ann.sos_events("watch", 5))["items"]
        self.assertEqual([e["id"] for e in events], [event["id"]])
        self.assertEqual(settle(h, ann.acknowledge_sos(event["id"]))["handled_by"], "ann")
        self.assertEqual(settle(h, watch.sos_event(event["id"]))["handled_by"], "ann")

        circle = settle(h, ann.add_circle_fence("watch", "home", 1.0, 2.0, 200.0))
        polygon = settle(
            h, ann.add_polygon_fence("watch", "park", [(0.0, 0.0), (0.0, 0.1), (0.1, 0.1)])
        )
        listed = {fence["id"] for fence in settle(h, ann.fences("watch"))["items"]}
        self.assertEqual(listed, {circle["id"], polygon["id"]})
        self.assertEqual(
            settle(h, ann.delete_fence("watch", polygon["id"])), {"deleted": polygon["id"]}
        )
        reported = settle(h, watch.report_positions([{"lat": 1.0, "lon": 2.0, "accuracy_m": None}]))
        self.assertEqual(reported["accepted"], 1)
        [position] = settle(h, ann.positions("watch", limit=10))["items"]
        self.assertEqual((position["lat"], position["lon"]), (1.0, 2.0))
        # Times go out as ISO 8601 whether given as epoch seconds or as text.
        earlier = h.ctx.now() - 60
        fixes = [{"lat": 1.5, "lon": 2.0, "at": earlier}, {"lat": 1.6, "lon": 2.0, "at": "x"}]
        with self.assertRaises(LogicError) as not_a_time:
            settle(h, watch.report_positions(fixes))
        self.assertIn("positions.1.at", not_a_time.exception.message)
        settle(h, watch.report_positions(fixes[:1]))
        older = settle(h, ann.positions("watch", until=earlier + 1))["items"]
        self.assertEqual([(p["lat"], p["at"]) for p in older], [(1.5, iso_time(earlier))])

        removed = settle(h, ann.unbind("watch", "ann"))
        self.assertEqual(removed["removed"], True)
        with self.assertRaises(LogicError) as refused:
            settle(h, ann.fences("watch"))
        self.assertIn(refused.exception.status, (403, 404))


class SubcommandTests(SynchronousTestCase):
    """The subcommands against the real service (posts) through the same client."""

    def setUp(self) -> None:
        self.h = LogicHarness(self)
        self.patch(login, "password", lambda: PASSWORD)

    def run_command(self, user: str | None, *argv: str) -> Any:
        token = None if user is None else self.h.token(user)
        api = LogicClient(None, "http://logic.invalid", token, http=self.h.http)
        options = cli.build_parser().parse_args(["--user", user or "ann", *argv])
        return settle(self.h, cli.logic_call(api, options))

    def test_register_post_like_from_the_command_line(self) -> None:
        h = self.h
        answer = self.run_command(None, "register", "--kind", "device")
        self.assertEqual((answer["name"], answer["kind"]), ("ann", "device"))
        h.node.users.names.add("ann")
        h.add_user("ben")
        post = self.run_command("ann", "post", "add", "hello", "--goal", "2", "--family")
        self.assertEqual((post["audience"], post["like_goal"]), ("family", 2))
        self.assertEqual(self.run_command("ben", "post", "list"), {"items": []})
        with self.assertRaises(LogicError) as hidden:
            self.run_command("ben", "like", str(post["id"]))
        self.assertEqual(hidden.exception.status, 404)
        public = self.run_command("ann", "post", "add", "open to all")
        self.assertEqual(self.run_command("ben", "like", str(public["id"]))["likes"], 1)
        self.assertEqual(
            self.run_command("ben", "likers", str(public["id"]), "--limit", "5"),
            {"items": ["ben"], "likes": 1},
        )
        self.assertEqual(self.run_command("ben", "unlike", str(public["id"]))["likes"], 0)
        self.assertEqual(self.run_command("ann", "post", "show", str(post["id"]))["text"], "hello")
        self.assertEqual(
            self.run_command("ann", "post", "del", str(post["id"])), {"deleted": post["id"]}
        )
        json.dumps(post)  # what logic_command prints


class Recorder:
    """A LogicClient stand-in: every method records its name and arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        async def record(*args: Any) -> list[Any]:
            self.calls.append((name, args))
            return []

        return record


class ArgumentTests(SynchronousTestCase):
    """Each subcommand's arguments, and the call they become."""

    def dispatch(self, *argv: str) -> tuple[str, tuple[Any, ...]]:
        self.patch(login, "password", lambda: PASSWORD)
        recorder = Recorder()
        d: Deferred[Any] = Deferred.fromCoroutine(cli.logic_call(recorder, parse(*argv)))
        fired(d)
        [call] = recorder.calls
        return call

    def test_every_subcommand_becomes_its_call(self) -> None:
        cases: list[tuple[list[str], tuple[str, tuple[Any, ...]]]] = [
            (["register"], ("register", ("ann", PASSWORD, "person", None))),
            (
                ["register", "--kind", "device", "--display-name", "Watch"],
                ("register", ("ann", PASSWORD, "device", "Watch")),
            ),
            (["bind", "code"], ("binding_code", ())),
            (["bind", "add", "watch", "123456"], ("bind", ("watch", "123456"))),
            (["bind", "list"], ("bindings", ())),
            (["bind", "approve", "watch", "dad"], ("approve_binding", ("watch", "dad"))),
            (["bind", "del", "watch", "dad"], ("unbind", ("watch", "dad"))),
            (
                ["sos", "raise", "-33.86", "151.2", "--accuracy", "12", "--battery", "40"],
                ("raise_sos", (-33.86, 151.2, 12.0, 40)),
            ),
            (["sos", "raise", "1", "2"], ("raise_sos", (1.0, 2.0, None, None))),
            (["sos", "list"], ("sos_events", (None, None))),
            (
                ["sos", "list", "--device", "watch", "--limit", "5"],
                ("sos_events", ("watch", 5)),
            ),
            (["sos", "show", "7"], ("sos_event", (7,))),
            (["sos", "ack", "7"], ("acknowledge_sos", (7,))),
            (
                ["fence", "add", "watch", "school", "--circle", "1.5,2.5,300"],
                ("add_circle_fence", ("watch", "school", 1.5, 2.5, 300.0)),
            ),
            (
                ["fence", "add", "watch", "park", "--polygon", "0,0", "0,1", "1,1"],
                ("add_polygon_fence", ("watch", "park", [(0.0, 0.0), (0.0, 1.0), (1.0, 1.0)])),
            ),
            (["fence", "list", "watch"], ("fences", ("watch",))),
            (["fence", "del", "watch", "3"], ("delete_fence", ("watch", 3))),
            (
                ["locate", "report", "10", "20", "--accuracy", "5", "--at", "1800000000"],
                (
                    "report_positions",
                    ([{"lat": 10.0, "lon": 20.0, "accuracy_m": 5.0, "at": 1800000000.0}],),
                ),
            ),
            (
                ["locate", "list", "watch", "--since", "100", "--until", "200", "--limit", "9"],
                ("positions", ("watch", 100.0, 200.0, 9)),
            ),
            (["locate", "list", "watch"], ("positions", ("watch", None, None, None))),
            (
                ["post", "add", "hi", "--media-url", "https://f/x", "--goal", "3", "--family"],
                ("create_post", ("hi", "https://f/x", 3, "family")),
            ),
            (["post", "add", "hi"], ("create_post", ("hi", None, None, None))),
            (
                ["post", "list", "--author", "ben", "--before", "9", "--limit", "5"],
                ("posts", ("ben", 9, 5)),
            ),
            (["post", "list"], ("posts", (None, None, None))),
            (["post", "show", "4"], ("post", (4,))),
            (["post", "del", "4"], ("delete_post", (4,))),
            (["like", "4"], ("like", (4,))),
            (["unlike", "4"], ("unlike", (4,))),
            (["likers", "4"], ("likers", (4, None, None))),
            (["likers", "4", "--limit", "2", "--offset", "0"], ("likers", (4, 2, 0))),
            (
                ["push", "register", "--provider", "apns", "--token", "ab12", "--locale", "zh"],
                ("register_push", ("apns", "ab12", None, "zh")),
            ),
            (["push", "show"], ("push_registration", ())),
            (["push", "remove"], ("remove_push", ())),
        ]
        for argv, expected in cases:
            self.assertEqual(self.dispatch(*argv), expected, argv)
        commands = {argv[0] for argv, _ in cases}
        self.assertEqual(commands, set(cli.LOGIC_COMMANDS))

    def test_push_commands_keep_their_session_the_others_log_out(self) -> None:
        """A logout ends the device's push registration (docs/push.md): ``push
        register`` must not undo itself."""
        from twisted.internet.defer import succeed
        from twisted.internet.task import Clock

        import cim.client.logic
        from cim.scripts import logic_commands, output

        logouts: list[str] = []

        class Router:
            def logout(self, token: str) -> Deferred[None]:
                logouts.append(token)
                return succeed(None)

        class Api:
            def __init__(self, *args: Any) -> None:
                pass

            def close(self) -> Deferred[None]:
                return succeed(None)

            def __getattr__(self, name: str) -> Any:
                return lambda *args: succeed({"called": name})

        async def router_token(reactor: Any, options: Any) -> tuple[Router, str]:
            return Router(), "the-token"

        self.patch(login, "router_token", router_token)
        self.patch(cim.client.logic, "LogicClient", Api)
        self.patch(output, "write_line", lambda *args: None)
        self.patch(logic_commands, "emit", lambda *args: None)
        for argv, logged_out in (
            (["push", "register", "--provider", "apns", "--token", "ab12"], False),
            (["push", "show"], False),
            (["like", "4"], True),
        ):
            del logouts[:]
            run = Deferred.fromCoroutine(logic_commands.logic_command(Clock(), parse(*argv)))  # type: ignore[arg-type]
            self.assertEqual(fired(run), 0)
            self.assertEqual(logouts, ["the-token"] if logged_out else [], argv)

    def test_the_login_device_is_not_the_device_argument(self) -> None:
        options = parse("--device", "laptop", "fence", "list", "watch")
        self.assertEqual((options.device, options.of_device), ("laptop", "watch"))

    def test_the_logic_url_option(self) -> None:
        self.assertEqual(parse("like", "1").logic, cli.DEFAULT_LOGIC)
        options = cli.build_parser().parse_args(
            ["--logic", "http://h:1", "--user", "a", "like", "1"]
        )
        self.assertEqual(options.logic, "http://h:1")

    def test_bad_arguments_are_usage_errors(self) -> None:
        for argv in (
            ["sos", "raise", "91", "0"],
            ["sos", "raise", "0", "181"],
            ["sos", "raise", "nan", "0"],
            ["sos", "raise", "0", "0", "--battery", "101"],
            ["sos", "ack", "0"],
            ["fence", "add", "watch", "x"],
            ["fence", "add", "watch", "x", "--circle", "1,2"],
            ["fence", "add", "watch", "x", "--circle", "1,2,3", "--polygon", "1,2"],
            ["fence", "add", "watch", "x", "--polygon", "1;2"],
            ["locate", "report", "0", "0", "--at", "-1"],
            ["post", "add", "hi", "--goal", "0"],
            ["post", "show", "x"],
            ["like"],
            ["like", "99999999999999999999"],
            ["likers", "1", "--offset", "-1"],
            ["bind"],
            ["bind", "add", "watch"],
            ["register", "--kind", "robot"],
        ):
            with self.assertRaises(SystemExit, msg=str(argv)) as exited:
                self.patch(cli.sys, "stderr", _Discard())
                parse(*argv)
            self.assertEqual(exited.exception.code, 2, argv)


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

"""Issue 16 in memory: rate limits and bounds through a whole node (NodeHarness) and the
client library.

- a user over the message limit gets RATE_LIMITED with a retry-after, and the client
  library delivers everything afterwards, in order;
- a group flood is refused before acceptance past the fan-out backlog, and every
  accepted post reaches every member;
- the archive that cannot keep up holds new messages back instead of dropping history;
- hellos per address are refused before the RSA decryption, and the library comes back;
- router logins per address, logic and file calls per user, SOS per device, posts per
  author answer 429 with Retry-After;
- cimctl limits raises a user's limit and the node honours it.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from cim.config import LimitsConfig, load_config
from cim.files.http.site import CallsPerUser
from cim.http.site import HttpError
from cim.im.collaborators import Bounds
from cim.limits.overrides import StoredOverrides
from cim.limits.policy import Limits
from cim.protocols import cim_pb2
from cim.protocols import im as im_protocol
from cim.scripts import cimctl
from cim.services.router import router_site
from cim.storage.database import Database
from tests.fakes.logic import LogicHarness
from tests.fakes.node import NodeHarness
from tests.unit.test_client_session import make_client, run_for, settle
from tests.unit.test_delivery import FakeGroups
from tests.unit.test_logic_bindings import bind, family
from tests.unit.test_logic_sos import HERE
from tests.unit.test_router import FakeAccounts, exchange

RATE_LIMITED = cim_pb2.Error.RATE_LIMITED
UNAVAILABLE = cim_pb2.Error.UNAVAILABLE


def bounds(clock: Any, **limits: Any) -> Bounds:
    config = LimitsConfig(**limits)
    return Bounds(
        Limits(clock, config),
        group_backlog=config.group_backlog,
        fanout_backlog=config.fanout_backlog,
        fanout_backlog_bytes=config.fanout_backlog_bytes,
    )


def limited_node(**limits: Any) -> NodeHarness:
    node = NodeHarness()
    return NodeHarness(clock=node.clock, bounds=bounds(node.clock, **limits))


def errors(events: Any) -> list[cim_pb2.Error]:
    return list(events.of_type(cim_pb2.ERROR))


class MessageLimitTests(SynchronousTestCase):
    def test_over_the_limit_is_rate_limited_and_not_taken(self) -> None:
        node = limited_node(messages=5.0, messages_burst=5)
        alice = node.connect("alice")
        bob = node.connect("bob", auto_ack=True)
        for seq in range(1, 9):
            alice.protocol.send(
                cim_pb2.MSG_R, cim_pb2.Message(to="bob", text=f"{seq}", client_seq=seq)
            )
        node.flush_all()
        self.assertEqual(
            [a.client_seq for a in alice.events.of_type(cim_pb2.MSG_A)], [1, 2, 3, 4, 5]
        )
        refused = errors(alice.events)
        self.assertEqual(
            [(e.code, e.client_seq) for e in refused], [(RATE_LIMITED, s) for s in (6, 7, 8)]
        )
        self.assertEqual(refused[0].retry_after_ms, 200)  # one token at 5/s
        self.assertTrue(all(e.retry_after_ms > 0 for e in refused))
        self.assertEqual(
            [m.text for m in bob.events.of_type(cim_pb2.MSG_N)], ["1", "2", "3", "4", "5"]
        )
        self.assertEqual(node.metrics.messages["rate_limited"], 3)
        # Sent again after the retry-after, in order, they are taken.
        node.clock.advance(0.2)
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="6", client_seq=6))
        node.flush_all()
        self.assertEqual(alice.events.of_type(cim_pb2.MSG_A)[-1].client_seq, 6)

    def test_the_client_library_delivers_everything_in_order_afterwards(self) -> None:
        """Acceptance 4 (first half): 40 messages sent at once against 5/s, burst 5."""
        node = limited_node(messages=5.0, messages_burst=5)
        alice, _, network = make_client(node, "alice")
        bob, _, _ = make_client(node, "bob")
        shown: list[str] = []
        bob.on_message = lambda message: shown.append(message.text)
        outcomes: list[Any] = []
        alice.start()
        bob.start()
        settle(node)
        for n in range(40):
            alice.send_text("bob", f"m{n:02d}").addCallback(outcomes.append)
        settle(node)
        self.assertGreater(node.metrics.messages["rate_limited"], 0)
        run_for(node, 12.0, step=0.05)
        self.assertEqual(shown, [f"m{n:02d}" for n in range(40)])
        self.assertEqual([o.status for o in outcomes], ["delivered"] * 40)
        self.assertEqual(len(alice.outbox.pacing), 0)
        sends = sum(1 for _, kind, _ in network.sent if kind == cim_pb2.MSG_R)
        # Paced one at a time: about one refusal per message, never a refused burst.
        self.assertLess(sends, 3 * 40)
        print(
            f"\n40 messages at 5/s burst 5: {sends} msg:R frames, "
            f"{node.metrics.messages['rate_limited']} refused, all delivered in order"
        )

    def test_pacing_keeps_other_conversations_going(self) -> None:
        node = limited_node(messages=2.0, messages_burst=2)
        alice, _, network = make_client(node, "alice")
        alice.start()
        bob = node.connect("bob", auto_ack=True)
        carol = node.connect("carol", auto_ack=True)
        settle(node)
        for n in range(3):
            alice.send_text("bob", f"b{n}")
        settle(node)  # b0, b1 taken; b2 refused: the bob conversation is paced
        self.assertEqual(len(alice.outbox.pacing), 1)
        alice.send_text("bob", "b3")  # held behind b2, not sent
        alice.send_text("carol", "c0")  # another conversation: sent at once
        sent = [m.text for _, kind, m in network.sent if kind == cim_pb2.MSG_R]
        self.assertEqual(sent, ["b0", "b1", "b2", "c0"])
        run_for(node, 4.0, step=0.1)
        self.assertEqual(
            [m.text for m in bob.events.of_type(cim_pb2.MSG_N)], ["b0", "b1", "b2", "b3"]
        )
        self.assertEqual([m.text for m in carol.events.of_type(cim_pb2.MSG_N)], ["c0"])

    def test_text_length_is_configured(self) -> None:
        node = NodeHarness(bounds=Bounds(max_text_length=10))
        alice = node.connect("alice")
        node.connect("bob", auto_ack=True)
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="x" * 11, client_seq=1))
        alice.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="x" * 10, client_seq=2))
        node.flush_all()
        [error] = errors(alice.events)
        self.assertEqual((error.code, error.client_seq), (cim_pb2.Error.BAD_REQUEST, 1))
        self.assertIn("at most 10 characters", error.message)
        self.assertEqual([a.client_seq for a in alice.events.of_type(cim_pb2.MSG_A)], [2])


class HeldMembers(FakeGroups):
    """Members known at once, but the fan-out's member list waits for ``release``."""

    def __init__(self, members: dict[str, list[str]]) -> None:
        super().__init__(members)
        self.waiting: list[Deferred[list[str]]] = []
        self.hold = True

    def member_names(self, group: str) -> Deferred[list[str]]:
        if not self.hold:
            return super().member_names(group)
        d: Deferred[list[str]] = Deferred()
        self.waiting.append(d)
        return d

    def release(self, group: str) -> None:
        self.hold = False
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(list(self.members[group]))


class GroupFloodTests(SynchronousTestCase):
    def test_a_group_flood_is_refused_before_acceptance_past_the_backlog(self) -> None:
        """Acceptance 4: nothing is ACCEPTED past the bound; every accepted post reaches
        every member; the refused ones come back through the library, in order."""
        members = ["alice", "m1", "m2"]
        groups = HeldMembers({"g": members})
        clock = NodeHarness().clock
        node = NodeHarness(clock=clock, groups=groups, bounds=bounds(clock, group_backlog=5))
        raw = node.connect("alice")
        m1 = node.connect("m1", auto_ack=True)
        for seq in range(1, 21):
            raw.protocol.send(
                cim_pb2.MSG_R, cim_pb2.Message(group="g", text=f"{seq}", client_seq=seq)
            )
        node.flush_all()
        accepted = [
            a.client_seq for a in raw.events.of_type(cim_pb2.ACK_N) if a.status == cim_pb2.ACCEPTED
        ]
        self.assertEqual(accepted, [1, 2, 3, 4, 5])
        refused = errors(raw.events)
        self.assertEqual([e.client_seq for e in refused], list(range(6, 21)))
        self.assertEqual({e.code for e in refused}, {RATE_LIMITED})
        self.assertEqual(refused[0].retry_after_ms, 1000)
        self.assertEqual(node.metrics.messages["group"], 5)  # only five were accepted
        groups.release("g")
        node.flush_all()
        self.assertEqual(
            [m.text for m in m1.events.of_type(cim_pb2.MSG_N)], ["1", "2", "3", "4", "5"]
        )
        self.assertEqual((node.im.groups.backlog_deliveries, node.im.groups.backlog_bytes), (0, 0))

    def test_the_library_gets_a_flood_through_in_order(self) -> None:
        groups = HeldMembers({"g": ["alice", "m1"]})
        clock = NodeHarness().clock
        node = NodeHarness(clock=clock, groups=groups, bounds=bounds(clock, group_backlog=3))
        alice, _, _ = make_client(node, "alice")
        alice.start()
        m1 = node.connect("m1", auto_ack=True)
        settle(node)
        outcomes: list[Any] = []
        for n in range(10):
            alice.send_group("g", f"p{n}").addCallback(outcomes.append)
        settle(node)
        self.assertEqual(len(outcomes), 3)
        groups.release("g")
        run_for(node, 15.0, step=0.25)
        self.assertEqual([o.status for o in outcomes], ["accepted"] * 10)
        received = m1.events.of_type(cim_pb2.MSG_N)
        self.assertEqual([m.text for m in received], [f"p{n}" for n in range(10)])
        self.assertEqual([m.group_seq for m in received], list(range(1, 11)))

    def test_the_node_wide_backlog_refuses_with_unavailable(self) -> None:
        groups = HeldMembers({"g1": ["alice", "m1"], "g2": ["alice", "m1"]})
        node = NodeHarness(groups=groups, bounds=Bounds(group_backlog=100, fanout_backlog=4))
        raw = node.connect("alice")
        for seq in range(1, 7):
            group = "g1" if seq % 2 else "g2"
            raw.protocol.send(cim_pb2.MSG_R, cim_pb2.Message(group=group, text="x", client_seq=seq))
        node.flush_all()
        self.assertEqual(len([a for a in raw.events.of_type(cim_pb2.ACK_N)]), 4)
        self.assertEqual(
            [(e.code, e.client_seq) for e in errors(raw.events)],
            [(UNAVAILABLE, 5), (UNAVAILABLE, 6)],
        )


class StoreBackpressureTests(SynchronousTestCase):
    def test_messages_wait_while_the_timelines_are_behind_and_none_is_dropped(self) -> None:
        node = NodeHarness()
        wait = [1.0]
        node.timelines.behind = lambda: wait[0]  # type: ignore[method-assign]
        alice, _, _ = make_client(node, "alice")
        alice.start()
        bob = node.connect("bob", auto_ack=True)
        settle(node)
        outcomes: list[Any] = []
        for n in range(3):
            alice.send_text("bob", f"m{n}").addCallback(outcomes.append)
        settle(node)
        self.assertEqual(bob.events.of_type(cim_pb2.MSG_N), [])
        self.assertEqual(outcomes, [])
        wait[0] = 0.0
        run_for(node, 5.0, step=0.25)
        self.assertEqual([m.text for m in bob.events.of_type(cim_pb2.MSG_N)], ["m0", "m1", "m2"])
        self.assertEqual([m.seq for m in bob.events.of_type(cim_pb2.MSG_N)], [1, 2, 3])
        self.assertEqual([o.status for o in outcomes], ["delivered"] * 3)


class HelloLimitTests(SynchronousTestCase):
    def test_hellos_per_address_are_refused_before_the_rsa_decryption(self) -> None:
        node = limited_node(hellos=1.0, hellos_burst=2)
        decrypted: list[bytes] = []
        original = im_protocol.accept_client_hello

        def counting(body: bytes, *args: Any, **kwargs: Any) -> Any:
            decrypted.append(body)
            return original(body, *args, **kwargs)

        self.patch(im_protocol, "accept_client_hello", counting)
        first = node.connect("u1", host="198.51.100.1")
        second = node.connect("u2", host="198.51.100.1")
        third = node.connect("u3", host="198.51.100.1")
        other = node.connect("u4", host="198.51.100.2")
        node.flush_all()
        for ok in (first, second, other):
            self.assertTrue(ok.protocol.logged_in.called and ok.protocol.login_result is not None)
        refusal = self.failureResultOf(third.protocol.logged_in).value
        self.assertEqual(refusal.reason, cim_pb2.HandshakeError.RATE_LIMITED)
        self.assertEqual(refusal.retry_after_ms, 1000)
        self.assertEqual(len(decrypted), 3)  # the refused one cost no RSA
        self.assertEqual(node.metrics.handshake_failures["rate_limited"], 1)

    def test_the_library_comes_back_after_the_retry_after(self) -> None:
        node = limited_node(hellos=0.5, hellos_burst=1)
        node.connect("first")
        node.flush_all()
        alice, _, network = make_client(node, "alice")
        states: list[str] = []
        alice.on_state = lambda state, detail: states.append(state)
        online = alice.start()
        settle(node)
        self.assertNoResult(online)
        run_for(node, 3.0, step=0.5)
        self.successResultOf(online)
        self.assertEqual(alice.state, "online")
        self.assertGreaterEqual(len(network.attempts), 2)
        self.assertNotIn("stopped", states)


class RouterLoginLimitTests(SynchronousTestCase):
    def test_logins_per_address_are_counted_before_the_password_hash(self) -> None:
        from cim.backends.registry.local import LocalRegistry
        from cim.backends.state.memory import MemoryState
        from cim.config import ImConfig, RouterConfig
        from cim.metrics import NodeMetrics
        from tests.unit.test_router import NODE

        clock = Clock()
        clock.advance(1_000_000)
        accounts = FakeAccounts({"alice": "correct horse battery staple"})
        state = MemoryState(clock)
        registry = LocalRegistry()
        self.successResultOf(registry.register(NODE))
        metrics = NodeMetrics()
        limits = Limits(clock, LimitsConfig(logins=1.0, logins_burst=2))
        site = router_site(
            RouterConfig(),
            ImConfig(),
            accounts,
            state.sessions,
            state.presence,
            registry,
            clock,
            metrics,
            limits=limits,
        )
        body = b'{"user": "alice", "password": "correct horse battery staple"}'
        headers = [("Content-Type", "application/json")]
        statuses = [exchange(site, "POST", "/api/v1/login", body, headers).status for _ in range(3)]
        self.assertEqual(statuses, [200, 200, 429])
        refused = exchange(site, "POST", "/api/v1/login", body, headers)
        self.assertEqual(refused.json()["error"], "rate_limited")
        self.assertEqual(refused.headers["retry-after"], "1")
        self.assertEqual(len(accounts.checked), 2)  # no hash for the refused ones
        self.assertEqual(metrics.logins["throttled"], 2)
        clock.advance(1.0)
        self.assertEqual(exchange(site, "POST", "/api/v1/login", body, headers).status, 200)


class LogicLimitTests(SynchronousTestCase):
    def test_logic_calls_per_user(self) -> None:
        h = LogicHarness(self, limits="logic = 1/s\nlogic_burst = 3\n")
        h.add_user("ann")
        h.add_user("ben")
        statuses = [h.call("GET", "/me", "ann")[0] for _ in range(4)]
        self.assertEqual(statuses, [200, 200, 200, 429])
        status, body = h.call("GET", "/me", "ann")
        self.assertEqual((status, body["error"]), (429, "rate_limited"))
        self.assertEqual(h.call("GET", "/me", "ben")[0], 200)  # per user
        h.clock.advance(1.0)
        self.assertEqual(h.call("GET", "/me", "ann")[0], 200)

    def test_sos_per_device_and_posts_per_author(self) -> None:
        h = LogicHarness(self, limits="sos = 1/m\nsos_burst = 2\nposts = 1/m\nposts_burst = 1\n")
        family(h, "watch", "g1")
        bind(h, "g1")
        statuses = [h.call("POST", "/sos", "watch", HERE)[0] for _ in range(3)]
        self.assertEqual(statuses, [201, 201, 429])
        h.add_user("poster")
        post = {"text": "hello", "audience": "everyone"}
        self.assertEqual(h.call("POST", "/posts", "poster", post)[0], 201)
        status, body = h.call("POST", "/posts", "poster", post)
        self.assertEqual((status, body["error"]), (429, "rate_limited"))
        h.clock.advance(60)
        self.assertEqual(h.call("POST", "/sos", "watch", HERE)[0], 201)
        self.assertEqual(h.call("POST", "/posts", "poster", post)[0], 201)


class FileCallLimitTests(SynchronousTestCase):
    def test_file_calls_per_user(self) -> None:
        node = NodeHarness()
        token, _ = node.login("ann")
        limits = Limits(node.clock, LimitsConfig(files=1.0, files_burst=2))
        bearer = CallsPerUser(node.state.sessions, limits)
        request = DummyRequest([b"api"])
        request.requestHeaders.addRawHeader(b"authorization", f"Bearer {token}".encode())
        for _ in range(2):
            self.assertEqual(
                self.successResultOf(Deferred.fromCoroutine(bearer.user(request))), "ann"
            )
        error = self.failureResultOf(Deferred.fromCoroutine(bearer.user(request)), HttpError).value
        self.assertEqual((error.status, error.code), (429, "rate_limited"))


class CimctlLimitsTests(SynchronousTestCase):
    def test_cimctl_limits_raises_a_users_limit_and_the_node_honours_it(self) -> None:
        """Acceptance 4: the operator raises alice's limit with cimctl; the node reads it
        (within override_refresh) and lets her burst through."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config_path = os.path.join(directory, "cim.ini")
        with open(config_path, "w", encoding="utf-8") as handle:
            handle.write(
                f"[node]\nid = t\ndata_dir = {directory}/data\n[accounts]\nscrypt_n = 1024\n"
                "[limits]\nmessages = 2/s\nmessages_burst = 2\noverride_refresh = 1s\n"
            )

        def cimctl_run(*argv: str, stdin: str = "") -> tuple[int, str]:
            out, err = io.StringIO(), io.StringIO()
            status = cimctl.main(
                ["--config", config_path, *argv], stdin=io.StringIO(stdin), stdout=out, stderr=err
            )
            return status, out.getvalue() + err.getvalue()

        self.assertEqual(cimctl_run("user", "add", "alice", stdin="pw-12345678\n")[0], 0)
        config = load_config(config_path)
        database = Database(config.database_url, None, runner=lambda work: succeed(work()))  # type: ignore[arg-type]
        self.successResultOf(database.start())
        self.addCleanup(database.stop)
        node = NodeHarness()
        overrides = StoredOverrides(database, node.clock, config.limits.override_refresh)
        self.successResultOf(overrides.start())
        self.addCleanup(overrides.stop)
        limits = Limits(node.clock, config.limits, overrides)
        node = NodeHarness(clock=node.clock, bounds=Bounds(limits))
        alice = node.connect("alice")
        node.connect("bob", auto_ack=True)

        def burst(first: int) -> list[int]:
            return resend(first, first + 100)

        def resend(first: int, end: int) -> list[int]:
            for seq in range(first, end):
                alice.protocol.send(
                    cim_pb2.MSG_R, cim_pb2.Message(to="bob", text="x", client_seq=seq)
                )
            node.flush_all()
            return [
                a.client_seq for a in alice.events.of_type(cim_pb2.MSG_A) if a.client_seq >= first
            ]

        self.assertEqual(len(burst(1)), 2)
        status, output = cimctl_run(
            "limits", "alice", "--messages-per-second", "500", "--burst", "1000"
        )
        self.assertEqual(status, 0, output)
        self.assertIn("500/s", output)
        node.clock.advance(1.0)  # the node reads the table again
        # The 98 refused are sent again, in order: all taken at once now.
        self.assertEqual(len(resend(3, 101)), 98)
        self.assertEqual(cimctl_run("limits", "alice", "--reset")[0], 0)
        node.clock.advance(1.0)
        self.assertEqual(len(resend(101, 201)), 2)

    def test_cimctl_limits_shows_json_and_refuses_nonsense(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config_path = os.path.join(directory, "cim.ini")
        with open(config_path, "w", encoding="utf-8") as handle:
            handle.write(
                f"[node]\nid = t\ndata_dir = {directory}/data\n[accounts]\nscrypt_n = 1024\n"
            )

        def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            status = cimctl.main(
                ["--config", config_path, *argv], stdin=io.StringIO(stdin), stdout=out, stderr=err
            )
            return status, out.getvalue(), err.getvalue()

        self.assertEqual(run("user", "add", "ann", stdin="pw-12345678\n")[0], 0)
        status, out, _ = run("limits", "ann", "--sos-per-minute", "6", "--json")
        self.assertEqual(status, 0)
        shown = json.loads(out)
        self.assertEqual(shown["user"], "ann")
        sos = next(item for item in shown["items"] if item["kind"] == "sos")
        self.assertEqual((sos["per_second"], sos["burst"], sos["own"]), (0.1, 5, True))
        self.assertTrue(sos["updated_at"].endswith("Z"))
        messages = next(item for item in shown["items"] if item["kind"] == "messages")
        self.assertEqual((messages["per_second"], messages["own"]), (50.0, False))
        self.assertEqual(run("limits", "nobody")[0], 1)
        self.assertEqual(run("limits", "ann", "--burst", "0")[0], 2)
        self.assertEqual(run("limits", "ann", "--reset", "--burst", "5")[0], 2)
        self.assertEqual(run("limits", "ann", "--messages-per-second", "-1")[0], 2)

"""The chaos run: steady traffic through the client library while faults come one at a
time, then the count of what every application was shown (see ``ledger``).

Traffic: 20 pairs of users write to each other (the direction alternates each
round) and two members of a ten-member group post each round, users spread over the
three nodes by the routers' ring. The faults, each followed by recovery (every node
healthy, every client online again, bounded waits that fail at their deadline) and a
few seconds of traffic: kill -9 a node (restarted after a while), kill -9 Redis
(restarted empty), stop RabbitMQ, kill -9 PostgreSQL (restarted), SIGSTOP a node
(then SIGCONT), reset five client connections. At the end: every sender's outcome
(bounded by the library's retry budget), then a catch-up on every client and a
bounded wait for every copy senders were told is fine.

``make chaos`` runs ``FULL`` (bench/chaos.py); tests/integration/test_chaos.py runs
``CI``, which keeps every fault and shortens the traffic and the outages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList

from tests.integration.support.chaos.app import RETRY, ChaosApp
from tests.integration.support.chaos.ledger import DIRECT, GROUP, Ledger, Row, table
from tests.integration.support.chaos.world import ChaosWorld, until
from tests.integration.support.cluster import reactor, sleep
from tests.integration.support.daemons import PASSWORD

PAIRS = 20
GROUP_SIZE = 10
GROUP_POSTERS_PER_ROUND = 2
RESETS = 5

BASELINE = "no fault"
NODE_KILLED = "kill -9 a node"
REDIS_KILLED = "kill -9 Redis (restarted empty)"
BROKER_STOPPED = "RabbitMQ stopped"
DATABASE_KILLED = "kill -9 PostgreSQL"
NODE_PAUSED = "SIGSTOP a node"
CONNECTIONS_RESET = "5 client connections reset"
FAULTS = (
    BASELINE,
    NODE_KILLED,
    REDIS_KILLED,
    BROKER_STOPPED,
    DATABASE_KILLED,
    NODE_PAUSED,
    CONNECTIONS_RESET,
)


@dataclass(frozen=True)
class Settings:
    name: str
    tick: float
    """Seconds between rounds: 20 1:1 messages and 2 group posts per round."""
    baseline: float
    settle: float
    """Traffic after each recovery, still counted in that fault's row."""
    node_down: float
    broker_down: float
    database_down: float
    node_paused: float
    phase_outcomes: float
    """How long each fault's recovery waits for the outcomes of what was sent so far
    (the table reports what never ended; the final wait is the retry budget's)."""
    refused_fills: float = 0.0
    """A standing fault beside the phases' own: the share of every client's gap fills
    refused UNAVAILABLE (``ChaosApp`` ``refuse_fills``)."""
    recovery_deadline: float = 120.0
    outcome_deadline: float = sum(RETRY.waits) + 30.0
    catch_up_deadline: float = 60.0


FULL = Settings(
    "full",
    tick=0.5,
    baseline=10,
    settle=10,
    node_down=10,
    broker_down=20,
    database_down=5,
    node_paused=15,
    phase_outcomes=60,
)
CI = Settings(
    "ci",
    tick=1.0,
    baseline=3,
    settle=4,
    node_down=5,
    broker_down=10,
    database_down=3,
    node_paused=10,
    phase_outcomes=10,
    catch_up_deadline=30,
    refused_fills=0.3,
)


@dataclass
class Report:
    settings: Settings
    rows: list[Row]
    placement: dict[str, int]
    seconds: float
    events: list[str] = field(default_factory=list)
    unanswered_catch_ups: int = 0
    """Clients whose final catch-up (an offline pull) never got its answer."""

    def table(self) -> str:
        return table(self.rows)


def spread_users(world: ChaosWorld) -> tuple[list[tuple[str, str]], list[str]]:
    """Pair and member names placed by the ring: half the pairs across two nodes,
    half on one node; the group's members over all three."""
    ring = world.ring()
    node_ids = [node.node_id for node in world.nodes]
    taken: set[str] = set()

    def on(node_index: int, stem: str) -> str:
        wanted = node_ids[node_index % len(node_ids)]
        for number in range(10_000):
            name = f"{stem}{number}"
            node = ring.node_for(name)
            if name not in taken and node is not None and node.node_id == wanted:
                taken.add(name)
                return name
        raise AssertionError(f"no name for {wanted}")

    pairs = [(on(i, f"a{i}x"), on(i + i % 2, f"b{i}x")) for i in range(PAIRS)]
    members = [on(i, f"g{i}x") for i in range(GROUP_SIZE)]
    return pairs, members


class Traffic:
    """A round every ``tick`` seconds, each message numbered in the ledger first."""

    def __init__(
        self,
        ledger: Ledger,
        apps: dict[str, ChaosApp],
        pairs: list[tuple[str, str]],
        group_id: str,
        members: list[str],
    ) -> None:
        self.ledger = ledger
        self.apps = apps
        self.pairs = pairs
        self.group_id = group_id
        self.members = members
        self.round = 0
        self.loop = task.LoopingCall(self._round)
        self.loop.clock = reactor

    def start(self, tick: float) -> None:
        self.loop.start(tick, now=True)

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()

    def _round(self) -> None:
        number = self.round
        self.round += 1
        phase = self.ledger.current
        for index, (first, second) in enumerate(self.pairs):
            sender, receiver = (first, second) if number % 2 == 0 else (second, first)
            key = f"{phase}|d{index}|{number}"
            self.ledger.send(key, DIRECT, sender, (receiver,))
            self._track(key, self.apps[sender].send_direct(receiver, key))
        for slot in range(GROUP_POSTERS_PER_ROUND):
            sender = self.members[(number * GROUP_POSTERS_PER_ROUND + slot) % len(self.members)]
            key = f"{phase}|g{slot}|{number}"
            others = tuple(member for member in self.members if member != sender)
            self.ledger.send(key, GROUP, sender, others)
            self._track(key, self.apps[sender].send_group(self.group_id, key))

    def _track(self, key: str, outcome: Deferred[tuple[str, str]]) -> None:
        outcome.addCallback(lambda ended: self.ledger.outcome(key, *ended))


async def run(scope: Any, settings: Settings, out: Callable[[str], None] = print) -> Report:
    """Build the world, run every fault, count; the scope's cleanup ends every process."""
    chaos = ChaosRun(scope, settings, out)
    await chaos.set_up()
    await chaos.faults()
    return await chaos.count()


class ChaosRun:
    """One run: its world, its clients and their ledger, and what happened when."""

    def __init__(self, scope: Any, settings: Settings, out: Callable[[str], None]) -> None:
        self.started = time.monotonic()
        self.scope = scope
        self.settings = settings
        self.out = out
        self.events: list[str] = []
        self.ledger = Ledger()
        self.world = ChaosWorld(scope)
        self.pairs, self.members = spread_users(self.world)
        self.users = [user for pair in self.pairs for user in pair] + self.members
        self.apps = {
            user: ChaosApp(
                reactor,
                self.world.routers,
                user,
                PASSWORD,
                self.ledger.show,
                refuse_fills=settings.refused_fills,
            )
            for user in self.users
        }
        self.placement: dict[str, int] = {}

    def event(self, line: str) -> None:
        self.events.append(f"{time.monotonic() - self.started:6.1f} s  {line}")
        self.out(self.events[-1])

    async def set_up(self) -> None:
        """Nodes up, every client online, the group made and joined."""
        self.world.start(self.users)
        self.scope.addCleanup(lambda: Deferred.fromCoroutine(self._stop_apps()))
        apps = self.apps
        await DeferredList([app.start() for app in apps.values()], fireOnOneErrback=True)
        self.group_id = await apps[self.members[0]].create_group("chaos", self.members[1:])
        for member in self.members[1:]:
            await apps[member].accept_group(self.group_id)
        for app in apps.values():
            self.placement[app.node_id] = self.placement.get(app.node_id, 0) + 1
        self.out(f"chaos ({self.settings.name}): {len(apps)} clients, placement {self.placement}")

    async def _stop_apps(self) -> None:
        for app in self.apps.values():
            await app.stop()

    async def faults(self) -> None:
        """Traffic all along; the faults one after another, each with its recovery."""
        settings, world, ledger = self.settings, self.world, self.ledger
        traffic = Traffic(ledger, self.apps, self.pairs, self.group_id, self.members)
        ledger.phase(BASELINE)
        traffic.start(settings.tick)
        await sleep(settings.baseline)
        killed, paused = world.nodes[1], world.nodes[2]
        victims = [
            self.apps[user]
            for user in (*self.pairs[0], self.pairs[2][1], self.members[1], self.members[2])
        ]
        try:
            await self._fault(NODE_KILLED, world.kill_node(killed, settings.node_down))
            await self._fault(REDIS_KILLED, world.kill_redis())
            await self._fault(BROKER_STOPPED, world.stop_broker(settings.broker_down))
            await self._fault(DATABASE_KILLED, world.kill_database(settings.database_down))
            await self._fault(NODE_PAUSED, world.pause_node(paused, settings.node_paused))
            await self._fault(CONNECTIONS_RESET, reset(victims))
        finally:
            traffic.stop()
        self.event(f"traffic stopped: {len(ledger.sent)} messages sent")

    async def _fault(self, name: str, action: Coroutine[Any, Any, None]) -> None:
        """``action`` is the fault, not started yet: it begins with the fault's phase."""
        self.ledger.phase(name)
        self.event(f"fault: {name}")
        await action
        self.event(f"{name}: over")
        await self._recovered(name)
        self.event(f"{name} so far: {self.ledger.summary(name)}")

    async def _recovered(self, what: str) -> None:
        """Every node healthy and every client online (the run stops if not), then every
        message sent so far answered (or the table says which were not), so one fault's
        resends do not spill into the next."""
        try:
            took = await until(
                lambda: all(app.online for app in self.apps.values()) and self.world.all_healthy(),
                self.settings.recovery_deadline,
                f"recovery after {what}: every node healthy, every client online",
            )
        except AssertionError as missing:
            offline = sorted(user for user, app in self.apps.items() if not app.online)
            healthy = await self.world.all_healthy()
            raise AssertionError(
                f"{missing}; clients offline: {offline or 'none'}; every node healthy: {healthy}"
            ) from None
        self.event(f"{what}: nodes healthy, clients online in {took:.1f} s")
        sent = list(self.ledger.sent.values())
        answered = await _bounded(
            lambda: all(message.status for message in sent),
            self.settings.phase_outcomes,
            "the outcome of every message sent so far",
        )
        waiting = sum(1 for message in sent if not message.status)
        self.event(f"{what}: {waiting} of the messages sent so far without an outcome ({answered})")
        await sleep(self.settings.settle)

    async def count(self) -> Report:
        """Every outcome, every client's catch-up, every copy shown (each bounded), then
        the table."""
        settings, ledger = self.settings, self.ledger
        with_outcome = await _bounded(
            lambda: ledger.unanswered() == 0, settings.outcome_deadline, "every outcome"
        )
        self.event(f"outcomes: {ledger.unanswered()} unanswered ({with_outcome})")
        pulls = [_waiting_for(app.catch_up()) for app in self.apps.values()]
        pulled = await _bounded(
            lambda: all(pull.called for pull in pulls),
            settings.catch_up_deadline,
            "every client's catch-up to be answered",
        )
        unanswered_pulls = sum(1 for pull in pulls if not pull.called)
        self.event(f"final catch-up: {unanswered_pulls} clients without an answer ({pulled})")
        caught_up = await _bounded(
            lambda: ledger.missing() == 0, settings.catch_up_deadline, "every copy shown"
        )
        self.event(f"after the catch-up: {ledger.missing()} copies missing ({caught_up})")
        if settings.refused_fills:
            fills = sum(app.fills for app in self.apps.values())
            refused = sum(app.refused_fills for app in self.apps.values())
            self.event(f"gap fills: {fills} asked, {refused} refused by the run")
        for line in ledger.missing_copies():
            self.event(line)
        rows = ledger.rows()
        for row in rows:
            for reason, count in row.failure_reasons.most_common():
                self.event(f"{row.phase} ({row.kind}): {count} failed: {reason}")
        seconds = time.monotonic() - self.started
        return Report(settings, rows, self.placement, seconds, self.events, unanswered_pulls)


def _waiting_for(library: Deferred[object]) -> Deferred[None]:
    """A Deferred of our own that fires when the library's does: waiting for it may
    stop without cancelling the library's work."""
    mine: Deferred[None] = Deferred()
    library.addBoth(lambda _: None if mine.called else mine.callback(None))
    return mine


async def reset(victims: list[ChaosApp]) -> None:
    """Reset the victims' connections and wait until each has a new one."""
    before = {victim.user: victim.connections for victim in victims}
    cut = [victim.user for victim in victims if victim.reset_connection()]
    if len(cut) != len(victims):
        raise AssertionError(f"only {cut} of the victims had a connection to reset")
    await until(
        lambda: all(victim.connections > before[victim.user] for victim in victims),
        60,
        "every reset client to connect again",
    )


async def _bounded(check: Callable[[], bool], deadline: float, what: str) -> str:
    """Wait for an end state the table reports either way: the table (and the test's
    assertions on it) say what was still wrong when the deadline passed."""
    try:
        took = await until(check, deadline, what)
    except AssertionError as passed:
        return str(passed)
    return f"after {took:.1f} s"

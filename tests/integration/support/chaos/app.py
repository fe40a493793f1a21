"""The chaos run's application: the one place that calls the client library.

The run counts what an application is handed, so it uses the library the way an
application does and nothing more. When the library changes (issue #14's new client:
timelines, cursors, summaries), this module is the one to adapt; the rest of the run
sees only ``ChaosApp`` and ``Shown``.

The library calls used, all on ``cim.client.session.ChatClient``:

- ``ChatClient(reactor, routers, user, password, device=, backoff=, rng=, retry=)``
  with ``Backoff`` and ``RetryPolicy``;
- ``start()``, ``stop(logout=False)``, ``catch_up.stop()``, ``state`` (``"online"``),
  ``ticket.node.node_id``, ``on_state`` (counts the connections: a reset client is back
  once it has a new one);
- ``on_message`` (the application's callback: what is counted as shown);
- ``send_text(to, text)`` and ``send_group(group_id, text)``, whose Deferreds fire with
  a ``DeliveryOutcome`` (``status``: delivered, stored, accepted, failed; ``reason``);
- ``group_request(GroupRequest(create=...))`` and ``group_request(GroupRequest(accept=...))``;
- ``catch_up.start()``: the catch-up a login or reconnect makes, asked for once more at
  the end of the run;
- ``protocol.transport.abortConnection()`` (``protocol`` is the current connection): a
  reset connection (the fault, not an application call);
- ``answers.history``, wrapped when the run refuses gap fills (``refuse_fills``: the
  fault, not an application call).

Message fields read: ``text``, ``from``, ``group``, ``client_seq``, and
``seq``/``conversation`` where the wire has them (the timelines wire; the current
one does not, and the run then orders by ``client_seq``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater

from cim.client.answers import RequestRefused
from cim.client.session import Backoff, ChatClient, DeliveryOutcome, RetryPolicy
from cim.protocols import cim_pb2

RETRY = RetryPolicy(delays=(4.0, 8.0, 16.0), final_wait=20.0)
"""Resends after 4, 12 and 28 s, failed at 48 s: longer than every outage of the run
(so failing is never the right answer for a message) and short enough for CI."""

_UNAVAILABLE: int = cim_pb2.Error.UNAVAILABLE

REFUSAL_DELAY = 0.2
"""Seconds a refused gap fill takes to come back (``ChaosApp`` ``refuse_fills``): the
round trip of a node's answer, so the refusal comes as the node's would, later."""


@dataclass(frozen=True)
class Shown:
    """One message as the application was handed it."""

    text: str
    sender: str
    conversation: str
    seq: int
    """The server's place in the conversation (0 where the wire has none)."""
    client_seq: int


def conversation_of(message: cim_pb2.Message, receiver: str) -> str:
    """The wire's conversation key where it has one, else one made the same way."""
    key = str(getattr(message, "conversation", "") or "")
    if key:
        return key
    if message.group:
        return f"g:{message.group}"
    sender = getattr(message, "from")
    first, second = sorted((sender, receiver))
    return f"d:{first}:{second}"


def _status(outcome: DeliveryOutcome) -> tuple[str, str]:
    return outcome.status, outcome.reason


class ChaosApp:
    """One user's device running the library, reporting what it shows."""

    def __init__(
        self,
        reactor: Any,
        routers: Sequence[str],
        user: str,
        password: str,
        on_shown: Callable[[str, Shown], None],
        refuse_fills: float = 0.0,
    ) -> None:
        self.user = user
        self._client = ChatClient(
            reactor,
            list(routers),
            user,
            password,
            device="chaos",
            backoff=Backoff(initial=0.2, maximum=2.0),
            rng=random.Random(user),
            retry=RETRY,
        )
        self._client.on_message = self._arrived
        self._client.on_state = self._state_changed
        self._on_shown = on_shown
        self.connections = 0
        """How many times the library has come online (a reconnect adds one)."""
        self.fills = 0
        """Gap fills asked (counted where the run refuses some: ``refuse_fills``)."""
        self.refused_fills = 0
        if refuse_fills:
            self._refuse_fills(reactor, refuse_fills)

    def _refuse_fills(self, reactor: Any, fraction: float) -> None:
        """A standing fault: ``fraction`` of this device's gap fills (HISTORY_R with
        ``after``) refused UNAVAILABLE, as a node whose database is down refuses them,
        once their retries are spent. The library's handling of a refused fill lost
        messages the faults alone showed about once in 13 runs (docs/reliability.md);
        refused here, it is exercised in every run. Done where the library asks, so the
        nodes run as shipped."""
        answers = self._client.answers
        asked = answers.history
        rng = random.Random(f"fills:{self.user}")

        def refused() -> cim_pb2.HistoryA:
            self.refused_fills += 1
            raise RequestRefused("HISTORY_R", "UNAVAILABLE: refused by the chaos run", _UNAVAILABLE)

        def history(request: cim_pb2.HistoryR) -> Deferred[cim_pb2.HistoryA]:
            if not request.after:
                return asked(request)  # a history page, not a gap fill
            self.fills += 1
            if rng.random() < fraction:
                return deferLater(reactor, REFUSAL_DELAY, refused)
            return asked(request)

        answers.history = history  # type: ignore[method-assign]

    def _state_changed(self, state: str, detail: str) -> None:
        if state == "online":
            self.connections += 1

    def _arrived(self, message: cim_pb2.Message) -> bool:
        self._on_shown(
            self.user,
            Shown(
                text=message.text,
                sender=getattr(message, "from"),
                conversation=conversation_of(message, self.user),
                seq=int(getattr(message, "seq", 0) or 0),
                client_seq=message.client_seq,
            ),
        )
        return True  # taken: the library acknowledges it and moves the cursor

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        return self._client.start()

    async def stop(self) -> None:
        await self._client.stop(logout=False)
        # A catch-up still retrying when the connection closed must not go on in a
        # client that is gone.
        self._client.catch_up.stop()

    @property
    def online(self) -> bool:
        return self._client.state == "online"

    @property
    def node_id(self) -> str:
        ticket = self._client.ticket
        return ticket.node.node_id if ticket is not None else ""

    # --- sending ----------------------------------------------------------------------

    def send_direct(self, to: str, text: str) -> Deferred[tuple[str, str]]:
        """Fires with the outcome: (delivered, stored or failed; the failure's reason)."""
        return self._client.send_text(to, text).addCallback(_status)

    def send_group(self, group_id: str, text: str) -> Deferred[tuple[str, str]]:
        """Fires with the outcome: (accepted or failed; the failure's reason)."""
        return self._client.send_group(group_id, text).addCallback(_status)

    async def create_group(self, name: str, invited: list[str]) -> str:
        answer = await self._client.group_request(
            cim_pb2.GroupRequest(create=cim_pb2.CreateGroup(name=name, members=invited))
        )
        if not answer.ok:
            raise AssertionError(f"creating group {name!r} was refused: {answer.message}")
        return str(answer.group.id)

    async def accept_group(self, group_id: str) -> None:
        answer = await self._client.group_request(
            cim_pb2.GroupRequest(accept=cim_pb2.GroupRef(group=group_id))
        )
        if not answer.ok:
            raise AssertionError(f"{self.user} could not join {group_id}: {answer.message}")

    # --- catching up and faults -------------------------------------------------------

    def catch_up(self) -> Deferred[object]:
        """What a device does to be sure it has everything: pull what is stored.

        The Deferred is the library's own (a pull in progress is shared): the caller
        must not cancel it, only stop waiting for it.
        """
        if not self.online:
            return succeed(None)
        return self._client.catch_up.start().addCallback(lambda _: None)

    def reset_connection(self) -> bool:
        """Cut the connection as a network reset would (RST); False if there was none."""
        protocol = self._client.protocol
        if protocol is None or protocol.transport is None:
            return False
        transport: Any = protocol.transport  # a TCP connection: ITCPTransport
        transport.abortConnection()
        return True

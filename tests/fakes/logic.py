"""The logic service in memory: real endpoints, real SQLite, a real IM node, fake time.

``LogicHarness`` puts the service's resource behind ``treq.testing.StubTreq`` (no
sockets), on a ``NodeHarness`` whose node writes system messages to real
timelines, so a test can call the HTTP API and then watch the notices arrive at
IM clients connected through iosim, or find them stored for a client that logs in
later. Database and KDF work run inline, so every call completes before ``call``
returns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from cim.accounts.store import AccountStore
from cim.client.session import ChatClient
from cim.config import parse_config
from cim.content import MediaUrls
from cim.groups.directory import GroupDirectory
from cim.http.openapi import PublishedSpec
from cim.im.contacts import ContactDirectory
from cim.im.system import SYSTEM_SENDER
from cim.limits.policy import NO_LIMITS, Limits
from cim.logic.contacts import ContactBook
from cim.logic.context import LogicContext
from cim.logic.notices import Notices
from cim.protocols import cim_pb2
from cim.services.logic import LogicService
from cim.storage.contacts import PrivacyDefaults
from tests.fakes.node import NodeHarness
from tests.fakes.timelines import fresh_database, run_now
from tests.unit.test_client_session import make_client, settle

PASSWORD = "Correct-horse-1"
BASE = "http://logic.invalid/api/v1"


def fired(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class LogicHarness:
    """One node with the logic service; ``config`` adds lines to the ``[logic]`` section
    (and may open others: ``[files] public_url`` is the node's own file URL), ``limits``
    a ``[limits]`` section (without one the service has no rate limits)."""

    def __init__(self, test: SynchronousTestCase, config: str = "", limits: str = "") -> None:
        self.test = test
        path = os.path.abspath(test.mktemp())
        os.makedirs(path)
        parsed = parse_config(
            "[node]\nid = node1\n[accounts]\nscrypt_n = 1024\nscrypt_r = 1\n"
            "[logic]\nenabled = true\n" + config + (f"\n[limits]\n{limits}" if limits else "")
        )
        self.config = parsed.logic
        self.db = fresh_database(path)
        test.addCleanup(self.db.stop)
        self.node = NodeHarness(database=self.db)
        self.clock = self.node.clock
        self.timelines = self.node.timelines
        self.accounts = AccountStore(
            self.db, parsed.accounts, kdf_runner=run_now, reactor=self.clock
        )
        self.accounts.start()
        # The node asks whether a receiver exists; the accounts table decides.
        self.node.im.directory.user_exists = self.accounts.exists
        self.groups = GroupDirectory(self.db, self.clock)
        self.contacts = ContactBook(self.db, self.clock, PrivacyDefaults())
        self.contacts.notices = self.groups.notices = Notices(self.node.im.system, self.clock)
        self.node.im.directory.contacts = ContactDirectory(self.contacts)
        self.ctx = LogicContext(
            self.config,
            parsed.accounts,
            self.db,
            self.accounts,
            self.node.state.sessions,
            Notices(self.node.im.system, self.clock),
            self.clock,
            self.groups,
            self.contacts,
            MediaUrls([parsed.files.public_url] if parsed.files.public_url else []),
            Limits(self.clock, parsed.limits) if limits else NO_LIMITS,
        )
        self.service = LogicService(self.ctx, self.clock)
        self.resource: PublishedSpec = self.service.resource
        self.http = StubTreq(self.resource)
        self.tokens: dict[str, str] = {}
        self.clients: dict[str, ChatClient] = {}
        self.inbox: dict[str, list[cim_pb2.Message]] = {}

    # --- accounts and sessions -----------------------------------------------------------

    def add_user(self, name: str, kind: str = "person", password: str = PASSWORD) -> None:
        fired(self.accounts.add_user(name, password, kind))
        self.node.users.names.add(name)

    def token(self, user: str) -> str:
        """The user's current token: its IM client's, or a fresh router login."""
        client = self.clients.get(user)
        if client is not None and client.ticket is not None:
            return client.ticket.token
        if user not in self.tokens:
            self.tokens[user], _ = self.node.login(user)
        return self.tokens[user]

    # --- HTTP ----------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        user: str | None = None,
        body: Any = None,
        token: str | None = None,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        """One request; returns the status and the decoded JSON answer."""
        headers: dict[str, str] = {}
        if token is None and user is not None:
            token = self.token(user)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = content_type
        d = self.http.request(method, BASE + path, headers=headers, data=data)
        self.flush()
        response = fired(d)
        content = self.http.content(response)
        self.flush()
        text = fired(content)
        payload = json.loads(text) if text else None
        return int(response.code), payload

    def start(
        self, method: str, path: str, user: str, body: Any = None
    ) -> Deferred[tuple[int, Any]]:
        """A request left running, for races: fires with the status and the JSON answer."""
        headers = {"Authorization": f"Bearer {self.token(user)}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"

        def decode(response: Any) -> Deferred[tuple[int, Any]]:
            content: Deferred[bytes] = self.http.content(response)
            return content.addCallback(
                lambda text: (int(response.code), json.loads(text) if text else None)
            )

        d = self.http.request(method, BASE + path, headers=headers, data=data)
        d.addCallback(decode)
        self.flush()
        return d

    def hold(self, txn: Callable[..., Any]) -> list[Callable[[], None]]:
        """From now on, database runs of ``txn`` wait: each leaves a function in the
        returned list that runs it (so a test can start requests together)."""
        waiting: list[Callable[[], None]] = []
        run = self.db.run

        def held(work: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
            if work is not txn:
                return run(work, *args, **kwargs)
            d: Deferred[Any] = Deferred()

            def release() -> None:
                run(work, *args, **kwargs).chainDeferred(d)

            waiting.append(release)
            return d

        self.test.patch(self.db, "run", held)
        return waiting

    def flush(self) -> None:
        for _ in range(5):
            self.http.flush()
            settle(self.node)

    # --- IM clients and their system messages -------------------------------------------

    def connect(self, user: str) -> ChatClient:
        """Log the user's IM client in; its system messages collect in ``inbox[user]``."""
        client, _, _ = make_client(self.node, user)
        received = self.inbox.setdefault(user, [])
        client.on_message = received.append
        self.clients[user] = client
        client.start()
        self.flush()
        return client

    def notices(self, user: str, event: str | None = None) -> list[dict[str, Any]]:
        """The system notices the user's client has shown, decoded, oldest first."""
        found = []
        for message in self.inbox.get(user, []):
            if message.type != cim_pb2.SYSTEM or getattr(message, "from") != SYSTEM_SENDER:
                continue
            notice = json.loads(message.text)
            if event is None or notice["event"] == event:
                found.append(notice)
        return found

"""cim.http.auth: the one bearer-token parser, token to session, the 401 and the 503."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from cim.backends.state import token_hash
from cim.backends.state.memory import MemoryState
from cim.http.auth import (
    BEARER_CHALLENGE,
    SEND_TOKEN,
    BearerSessions,
    bearer_token,
    invalid_token,
    state_unavailable,
)
from cim.http.site import HttpError
from cim.interfaces import SessionRecord, StateUnavailable

TOKEN = "A" * 43


def request_with(authorization: bytes | None) -> DummyRequest:
    request = DummyRequest([b""])
    if authorization is not None:
        request.requestHeaders.addRawHeader(b"authorization", authorization)
    return request


def run(coroutine: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coroutine)


class BearerTokenTests(SynchronousTestCase):
    def test_the_token_of_a_bearer_header(self) -> None:
        for header in (
            b"Bearer " + TOKEN.encode(),
            b"bearer " + TOKEN.encode(),
            b"BEARER   " + TOKEN.encode(),
            b"  Bearer " + TOKEN.encode() + b"  ",
        ):
            self.assertEqual(bearer_token(request_with(header)), TOKEN, header)

    def test_every_b64token_character_is_accepted(self) -> None:
        token = "az-AZ_09.~+/=="
        self.assertEqual(bearer_token(request_with(b"Bearer " + token.encode())), token)

    def test_no_header_or_a_malformed_one_is_no_token(self) -> None:
        for header in (
            None,
            b"",
            b"Bearer",
            b"Bearer ",
            b"Basic dXNlcjpwYXNz",
            b"Bearer\t" + TOKEN.encode(),
            b"Bearer two tokens",
            b"Bearer tok!en",
            b"Bearer " + b"a" * 513,
            b"Bearer \xff\xfe",
            b"BearerX " + TOKEN.encode(),
        ):
            self.assertIsNone(bearer_token(request_with(header)), header)

    def test_the_longest_token_accepted(self) -> None:
        self.assertEqual(bearer_token(request_with(b"Bearer " + b"a" * 512)), "a" * 512)


class RefusalTests(SynchronousTestCase):
    def test_invalid_token_is_a_401_with_a_challenge(self) -> None:
        reply = invalid_token().reply()
        self.assertEqual(reply.status, 401)
        self.assertEqual(json.loads(reply.body), {"error": "invalid_token", "message": SEND_TOKEN})
        self.assertIn(BEARER_CHALLENGE, reply.headers)
        self.assertEqual(BEARER_CHALLENGE, (b"WWW-Authenticate", b'Bearer realm="cim"'))
        self.assertEqual(json.loads(invalid_token("gone").reply().body)["message"], "gone")

    def test_state_unavailable_is_a_503_to_retry(self) -> None:
        reply = state_unavailable().reply()
        self.assertEqual(reply.status, 503)
        self.assertEqual(
            json.loads(reply.body),
            {
                "error": "state_unavailable",
                "message": "the session store is unreachable; try again shortly",
            },
        )
        self.assertEqual(reply.headers, ((b"Retry-After", b"5"),))


class CountingSessions:
    """A sessions facet that counts lookups and can be down."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.down = False

    def session_for_token(self, token_hash: str) -> Deferred[SessionRecord | None]:
        self.calls.append("session_for_token")
        if self.down:
            return defer.fail(StateUnavailable("redis is down"))
        result: Deferred[SessionRecord | None] = self.inner.session_for_token(token_hash)
        return result

    def end_session(self, token_hash: str, reason: str) -> Deferred[SessionRecord | None]:
        self.calls.append("end_session")
        if self.down:
            return defer.fail(StateUnavailable("redis is down"))
        result: Deferred[SessionRecord | None] = self.inner.end_session(token_hash, reason)
        return result


class BearerSessionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = MemoryState(Clock())
        self.record, _ = self.successResultOf(
            self.state.sessions.create_session(
                token_hash(TOKEN), "alice", "phone", "n1", 3600, "kick_old"
            )
        )
        self.sessions = CountingSessions(self.state.sessions)
        self.bearer = BearerSessions(self.sessions)  # type: ignore[arg-type]

    def refusal(self, d: Deferred[Any]) -> HttpError:
        error = self.failureResultOf(d, HttpError).value
        assert isinstance(error, HttpError)
        return error

    def test_a_known_token_names_its_session_and_user(self) -> None:
        request = request_with(b"Bearer " + TOKEN.encode())
        self.assertEqual(self.successResultOf(run(self.bearer.session(request))), self.record)
        self.assertEqual(self.successResultOf(run(self.bearer.user(request))), "alice")

    def test_an_unknown_token_is_a_401(self) -> None:
        error = self.refusal(run(self.bearer.session(request_with(b"Bearer " + b"B" * 43))))
        self.assertEqual((error.status, error.code), (401, "invalid_token"))
        self.assertEqual(self.sessions.calls, ["session_for_token"])

    def test_no_token_is_a_401_without_asking_the_store(self) -> None:
        for header in (None, b"Basic abc", b"Bearer tok!en"):
            error = self.refusal(run(self.bearer.user(request_with(header))))
            self.assertEqual((error.status, error.code), (401, "invalid_token"))
            self.assertEqual(error.message, SEND_TOKEN)
        self.assertEqual(self.sessions.calls, [])

    def test_a_store_that_is_down_is_a_503(self) -> None:
        self.sessions.down = True
        request = request_with(b"Bearer " + TOKEN.encode())
        for d in (run(self.bearer.session(request)), run(self.bearer.end_session(request, "x"))):
            error = self.refusal(d)
            self.assertEqual((error.status, error.code), (503, "state_unavailable"))

    def test_end_session_logs_the_token_out(self) -> None:
        request = request_with(b"Bearer " + TOKEN.encode())
        ended = self.successResultOf(run(self.bearer.end_session(request, "logged out")))
        self.assertEqual(ended, self.record)
        self.assertIsNone(
            self.successResultOf(self.state.sessions.session_for_token(token_hash(TOKEN)))
        )
        self.assertIsNone(self.successResultOf(run(self.bearer.end_session(request, "again"))))

    def test_end_session_without_a_token_asks_nothing(self) -> None:
        self.assertIsNone(
            self.successResultOf(run(self.bearer.end_session(request_with(None), "x")))
        )
        self.assertEqual(self.sessions.calls, [])

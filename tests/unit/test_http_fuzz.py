"""No request produces a 500 or a traceback (issue 16, HTTP): mutated requests, seeded.

Valid requests to the router and the file service are mutated (inserted separators,
huge numbers, NULs, high bytes, cut pieces), sent in random slices, with the clock
moved past deadlines; nothing may escape the protocol, be logged as an error, or be
answered 500.
"""

from __future__ import annotations

import os
import random
from typing import cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server

from cim.backends.registry.local import LocalRegistry
from cim.backends.state.memory import MemoryState
from cim.config import ImConfig, RouterConfig
from cim.metrics import NodeMetrics
from cim.services.router import router_site
from tests.unit.test_files import TOKENS, FileServiceTestCase, content_md5
from tests.unit.test_http_limits import Connection
from tests.unit.test_router import FakeAccounts

TOKENS_OF_TROUBLE = [
    b"\r\n",
    b":",
    b" ",
    b"\x00",
    b"\x1e",
    b"9" * 5000,
    b"-",
    b"%",
    b"\xff",
    b"chunked",
    b"Content-Length: ",
    b"Range: bytes=",
    b"?",
    b"&expires=",
    b"=",
    b"\r\n\r\n",
    b"{",
    b"1e999",
    b"[" * 1000,
]


def mutated(base: bytes, rnd: random.Random) -> bytes:
    data = bytearray(base)
    for _ in range(rnd.randint(1, 6)):
        choice, at = rnd.random(), rnd.randint(0, len(data))
        if choice < 0.4:
            data[at:at] = rnd.choice(TOKENS_OF_TROUBLE)
        elif choice < 0.6 and len(data) > 1:
            del data[at : at + rnd.randint(1, 20)]
        else:
            data[at:at] = bytes(rnd.randint(0, 255) for _ in range(rnd.randint(1, 8)))
    return bytes(data)


class Fuzzing:
    clock: Clock

    def fuzz(self, test: SynchronousTestCase, site: server.Site, bases: list[bytes]) -> int:
        errors: list[LogEvent] = []

        def observe(event: LogEvent) -> None:
            if event.get("log_failure") is not None or event.get("isError"):
                errors.append(event)

        observer = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(observer)
        test.addCleanup(globalLogPublisher.removeObserver, observer)
        rnd = random.Random(16)
        answered = 0
        for _ in range(1500):
            data = mutated(rnd.choice(bases), rnd)
            connection = Connection(site)
            step = rnd.randint(1, 64)
            for start in range(0, len(data), step):
                connection.send(data[start : start + step])
            self.clock.advance(rnd.choice([0, 1, 11, 45, 70]))
            response = connection.transport.value()
            test.assertNotIn(b" 500 ", response[:16], data[:300])
            answered += bool(response)
            connection.lose()
        test.assertEqual(errors, [])
        return answered


class RouterFuzzTests(SynchronousTestCase, Fuzzing):
    def test_mutated_router_requests(self) -> None:
        self.clock = Clock()
        state = MemoryState(self.clock)
        site = router_site(
            RouterConfig(),
            ImConfig(),
            FakeAccounts({"alice": "secret"}),
            state.sessions,
            state.presence,
            LocalRegistry(),
            self.clock,
            NodeMetrics(),
        )
        body = b'{"user": "alice", "password": "secret"}'
        bases = [
            b"POST /api/v1/login HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
            b"GET /api/v1/online?offset=1&limit=5 HTTP/1.1\r\nHost: a\r\n\r\n",
            b"POST /api/v1/logout HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer xyz\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ]
        self.assertGreater(self.fuzz(self, site, bases), 1000)


class FilesFuzzTests(FileServiceTestCase, Fuzzing):
    def test_mutated_file_requests(self) -> None:
        data = os.urandom(2000)
        stored = self.stored(data, name="a.bin")
        upload = self.create(os.urandom(100), name="b.bin")
        signed = stored["url"].removeprefix("http://files.test").encode()
        bearer = f"Authorization: Bearer {TOKENS['alice']}".encode()
        chunk = b"x" * 100
        bases = [
            b"GET %s HTTP/1.1\r\nHost: f\r\nRange: bytes=10-20\r\n\r\n" % signed,
            b"GET %s HTTP/1.1\r\nHost: f\r\nIf-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT"
            b'\r\nIf-Range: "x"\r\n\r\n' % signed,
            b"GET /api/v1/files/%s HTTP/1.1\r\nHost: f\r\n%s\r\n\r\n"
            % (stored["file_id"].encode(), bearer),
            b"PUT /api/v1/uploads/%s/chunks/0 HTTP/1.1\r\nHost: f\r\n%s\r\nContent-MD5: %s\r\n"
            b"Content-Length: 100\r\n\r\n%s"
            % (upload["upload_id"].encode(), bearer, content_md5(chunk).encode(), chunk),
        ]
        self.assertGreater(self.fuzz(self, self.site, bases), 1000)

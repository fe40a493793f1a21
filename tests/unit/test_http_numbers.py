"""Numbers from requests are bounded before conversion (issue 16, Seen 8): 400s, never 500s."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cim.backends.registry.local import LocalRegistry
from cim.backends.state.memory import MemoryState
from cim.config import ImConfig, RouterConfig
from cim.files.http.downloads import ByteRange, parse_range
from cim.http.endpoints import EndpointResource
from cim.http.schema import MAX_DIGITS, convert_param, convert_query, whole_number
from cim.http.site import HttpError, bounded_site
from cim.metrics import NodeMetrics
from cim.services.router import router_site
from tests.fakes.operators import bearer, operator_tokens
from tests.unit.test_files import FileServiceTestCase
from tests.unit.test_http_endpoints import callers, endpoints
from tests.unit.test_router import FakeAccounts, HttpConnection, exchange, request_bytes

HUGE = "9" * 5000


class WholeNumberTests(SynchronousTestCase):
    def test_digits_up_to_the_limit_convert(self) -> None:
        self.assertEqual(whole_number("0", "n"), 0)
        self.assertEqual(whole_number(b"9" * MAX_DIGITS, "n"), int("9" * MAX_DIGITS))

    def test_more_digits_are_a_400_naming_the_value(self) -> None:
        for raw in ("9" * (MAX_DIGITS + 1), HUGE, HUGE.encode()):
            with self.assertRaises(HttpError) as caught:
                whole_number(raw, "expires")
            self.assertEqual((caught.exception.status, caught.exception.code), (400, "bad_request"))
            self.assertIn("expires", caught.exception.message)

    def test_anything_else_is_not_a_number(self) -> None:
        # "²" and "٣" are isdigit() to Python, and int() refuses the first.
        for raw in ("", "-1", "+1", " 1", "1_000", "²", "٣", "0x10", "1e3", b"\xb2"):
            self.assertIsNone(whole_number(raw, "n"), raw)

    def test_path_ids_of_any_shape_are_not_found(self) -> None:
        for raw in ("²", HUGE, "9" * 19, "0"):
            with self.assertRaises(HttpError) as caught:
                convert_param("post", raw, {"type": "integer"})
            self.assertEqual(caught.exception.status, 404, raw)
        self.assertEqual(convert_param("post", "42", {"type": "integer"}), 42)

    def test_query_numbers_are_bounded_before_conversion(self) -> None:
        for kind in ("integer", "number"):
            with self.assertRaises(HttpError) as caught:
                convert_query("limit", HUGE.encode(), {"type": kind})
            self.assertEqual(caught.exception.status, 400)
        self.assertEqual(convert_query("limit", b"-7", {"type": "integer"}), -7)
        self.assertEqual(convert_query("at", b"1.5e3", {"type": "number"}), 1500.0)


class RangeTests(SynchronousTestCase):
    def test_ranges_as_before(self) -> None:
        self.assertEqual(parse_range(b"bytes=10-19", 100), ByteRange(10, 19))
        self.assertEqual(parse_range(b"bytes=-10", 100), ByteRange(90, 99))
        self.assertEqual(parse_range(b"bytes=90-", 100), ByteRange(90, 99))
        self.assertEqual(parse_range(b"bytes=100-", 100), "unsatisfiable")
        self.assertEqual(parse_range(b"bytes=" + b"9" * 19 + b"-", 100), "unsatisfiable")
        self.assertIsNone(parse_range(b"bytes=1-2,5-6", 100))

    def test_numbers_past_any_file_are_a_400(self) -> None:
        for header in (f"bytes={HUGE}-", f"bytes=-{HUGE}", f"bytes=0-{HUGE}"):
            with self.assertRaises(HttpError) as caught:
                parse_range(header.encode(), 100)
            self.assertEqual(caught.exception.status, 400)


class DownloadNumberTests(FileServiceTestCase):
    """Seen 8 over the file service's Site: each was a 500 or a dropped connection."""

    def setUp(self) -> None:
        super().setUp()
        self.file = self.stored(os.urandom(3000), name="a.bin")

    def test_a_5000_digit_range_is_a_400(self) -> None:
        for header in (f"bytes={HUGE}-", f"bytes=-{HUGE}"):
            response = self.get_url(self.file["url"], headers=[("Range", header)])
            self.assertError(response, 400, "bad_request")

    def test_a_5000_digit_expires_is_a_400(self) -> None:
        path = f"/files/{self.file['file_id']}?expires={HUGE}&sig=abc"
        # Every download needs its reader's token first (issue 17): without one, 401.
        self.assertError(self.call("GET", path, user=None), 401, "invalid_token")
        # With a token, the number is refused before the signature is looked at.
        self.assertError(self.call("GET", path), 400, "bad_request")

    def test_a_20_kib_range_header_is_answered(self) -> None:
        connection = HttpConnection(self.site)
        path = self.file["url"].removeprefix("http://files.test")
        connection.send(request_bytes("GET", path, headers=[("Range", "bytes=" + "1" * 20480)]))
        response = connection.response()
        self.assertEqual(response.status, 431)
        self.assertEqual(response.json()["error"], "request_header_fields_too_large")

    def test_a_sane_range_still_works(self) -> None:
        response = self.get_url(self.file["url"], headers=[("Range", "bytes=0-9")])
        self.assertEqual(response.status, 206, response.body)
        self.assertEqual(len(response.body), 10)


class RouterNumberTests(SynchronousTestCase):
    def test_a_5000_digit_offset_is_a_400(self) -> None:
        clock = Clock()
        state = MemoryState(clock)
        site = router_site(
            RouterConfig(),
            ImConfig(),
            FakeAccounts({}),
            state.sessions,
            state.presence,
            LocalRegistry(),
            clock,
            NodeMetrics(),
            operators=operator_tokens(self),
        )
        for query in (f"offset={HUGE}", f"limit={HUGE}", "offset=%C2%B2"):
            response = exchange(site, "GET", f"/api/v1/online?{query}", headers=[bearer()])
            self.assertEqual(response.status, 400, query)
            self.assertEqual(response.json()["error"], "bad_request")


class EndpointNumberTests(SynchronousTestCase):
    def test_odd_ids_in_a_path_are_refused_not_failed(self) -> None:
        """A raw byte 0xB2 ('²' in latin-1) is refused as malformed HTTP; a huge id is a 404."""
        resource = EndpointResource(endpoints(), callers, 1024, prefix="/api")
        site = bounded_site(resource, 1024, Clock())
        for path in (b"/api/things/\xb2", b"/api/things/" + HUGE.encode()):
            connection = HttpConnection(site)
            connection.send(
                b"GET %s HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer good\r\n\r\n" % path
            )
            self.assertIn(connection.response().status, (400, 404), path)
        limited = exchange(
            site, "GET", "/api/things/1?limit=" + HUGE, headers=[("Authorization", "Bearer good")]
        )
        self.assertEqual(limited.status, 400)

"""cim.http.endpoints and cim.http.openapi: the declared-endpoint machinery on its own."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server

from cim.http.auth import invalid_token
from cim.http.endpoints import Call, Endpoint, EndpointResource, nobody
from cim.http.openapi import PublishedSpec, openapi_document
from cim.http.schema import object_schema
from cim.http.site import Reply, json_reply


class Refused(Exception):
    """A domain's refusal, answered through ``error_replies``."""


async def echo(call: Call[str]) -> Reply:
    return json_reply(
        200,
        {
            "caller": call.caller,
            "params": dict(call.params),
            "query": dict(call.query),
            "body": dict(call.body),
        },
    )


async def refuse(call: Call[str]) -> Reply:
    raise Refused()


async def break_down(call: Call[str]) -> Reply:
    raise RuntimeError("a bug")


async def stream(call: Call[str]) -> None:
    call.request.setResponseCode(200)
    call.request.write(b"streamed")
    call.request.finish()


async def callers(request: server.Request) -> str:
    if request.getHeader(b"authorization") != b"Bearer good":
        raise invalid_token()
    return "alice"


def endpoints() -> list[Endpoint[str]]:
    return [
        Endpoint(
            "GET",
            "/things/{thing}",
            "get_thing",
            "a thing",
            "things",
            echo,
            params={"thing": {"type": "integer"}},
            query={"limit": {"type": "integer", "minimum": 1, "maximum": 10}},
        ),
        Endpoint(
            "POST",
            "/things",
            "add_thing",
            "add a thing",
            "things",
            echo,
            body=object_schema({"n": {"type": "integer", "maximum": 5}}, ["n"]),
        ),
        Endpoint("PUT", "/loose", "loose", "any object", "things", echo, json_body=True),
        Endpoint(
            "GET",
            "/ids/{id}",
            "by_id",
            "a shaped segment",
            "things",
            echo,
            segments={"id": "[a-z]{1,4}"},
            authenticated=False,
        ),
        Endpoint(
            "GET",
            "/names/{name}",
            "by_name",
            "a schema'd parameter",
            "things",
            echo,
            params={"name": {"type": "string", "pattern": "^[a-z]{1,4}$"}},
            authenticated=False,
        ),
        Endpoint("GET", "/refused", "refused", "refused", "errors", refuse, authenticated=False),
        Endpoint("GET", "/broken", "broken", "a bug", "errors", break_down, authenticated=False),
        Endpoint("GET", "/stream", "stream", "streamed", "errors", stream, authenticated=False),
    ]


def refusals(error: Exception, endpoint: Endpoint[Any]) -> Reply | None:
    if isinstance(error, Refused):
        return json_reply(418, {"error": "refused", "message": endpoint.operation_id})
    return None


class EndpointResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resource = EndpointResource(
            endpoints(), callers, 1024, prefix="/api", error_replies=refusals
        )
        self.http = StubTreq(self.resource)

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = "good",
        raw: bytes | None = None,
        http: StubTreq | None = None,
    ) -> tuple[int, Any, Any]:
        http = http or self.http
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        response = self.successResultOf(
            http.request(method, "http://test.invalid/api" + path, headers=headers, data=data)
        )
        text = self.successResultOf(http.content(response))
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            payload = text
        return int(response.code), payload, response.headers

    def test_parameters_body_and_caller_reach_the_endpoint(self) -> None:
        status, body, _ = self.call("GET", "/things/42?limit=3")
        self.assertEqual(status, 200)
        self.assertEqual(
            body, {"caller": "alice", "params": {"thing": 42}, "query": {"limit": 3}, "body": {}}
        )
        status, body, _ = self.call("POST", "/things", {"n": 5})
        self.assertEqual((status, body["body"]), (200, {"n": 5}))

    def test_checks_run_in_order_body_before_caller(self) -> None:
        self.assertEqual(self.call("POST", "/things", {"n": 6}, token=None)[0], 400)
        self.assertEqual(self.call("POST", "/things", {"n": 1}, token=None)[0], 401)
        self.assertEqual(self.call("GET", "/things/x", token=None)[0], 404)
        self.assertEqual(self.call("GET", "/things/1?limit=0", token=None)[0], 400)

    def test_control_characters_are_refused_in_bodies_and_queries_of_every_endpoint(
        self,
    ) -> None:
        from cim.http.schema import body_problem, body_validator, convert_query
        from cim.http.site import HttpError

        validator = body_validator({"type": "object"})
        for body, where in (
            ({"a": "\x1b[31m"}, "body.a"),
            ({"a": ["ok", "b\rc"]}, "body.a[1]"),
            ({"a": {"b\x1b": 1}}, "body.a"),
            ({"a": "\x00"}, "body.a"),
        ):
            self.assertEqual(
                body_problem(validator, body),
                f"{where}: text may not contain control characters (newline and tab are fine)",
            )
        self.assertIsNone(body_problem(validator, {"a": "x\ty\nz 👍"}))
        status, body, _ = self.call("POST", "/things", raw=b'{"n": 1, "x": "\\u001b"}')
        self.assertEqual((status, body["error"]), (400, "bad_request"))
        self.assertIn("control characters", body["message"])
        with self.assertRaises(HttpError) as caught:
            convert_query("author", b"ann\x1b[2J", {"type": "string"})
        self.assertEqual(caught.exception.status, 400)
        self.assertEqual(convert_query("q", b"a\tb", {"type": "string"}), "a\tb")

    def test_a_json_body_without_schema_is_read_but_not_checked(self) -> None:
        status, body, _ = self.call("PUT", "/loose", {"name": "a\x00b", "x": [1]})
        self.assertEqual((status, body["body"]), (200, {"name": "a\x00b", "x": [1]}))
        self.assertEqual(self.call("PUT", "/loose", raw=b"[1]")[0], 400)
        self.assertEqual(self.call("PUT", "/loose", {"n": 1}, token=None)[0], 401)

    def test_segments_and_parameters_miss_differently(self) -> None:
        self.assertEqual(self.call("GET", "/ids/abc")[1]["params"], {"id": "abc"})
        status, body, _ = self.call("GET", "/ids/ABC")
        self.assertEqual((status, body["message"]), (404, "no such resource"))
        status, body, _ = self.call("DELETE", "/ids/ABC")
        self.assertEqual(status, 404)
        status, body, _ = self.call("GET", "/names/ABC")
        self.assertEqual((status, body["message"]), (404, "no such name"))
        status, _, headers = self.call("DELETE", "/names/ABC")
        self.assertEqual((status, headers.getRawHeaders("Allow")), (405, ["GET"]))

    def test_unknown_paths_and_methods(self) -> None:
        self.assertEqual(self.call("GET", "/nothing")[1]["error"], "not_found")
        status, body, headers = self.call("PATCH", "/things")
        self.assertEqual((status, body["error"]), (405, "method_not_allowed"))
        self.assertEqual(headers.getRawHeaders("Allow"), ["POST"])

    def test_head_is_get_without_a_body_unless_switched_off(self) -> None:
        status, body, headers = self.call("HEAD", "/ids/abc")
        self.assertEqual((status, body), (200, None))
        self.assertEqual(headers.getRawHeaders("Content-Type"), ["application/json"])
        strict = EndpointResource(endpoints(), callers, 1024, prefix="/api", head_as_get=False)
        status, _, headers = self.call("HEAD", "/ids/abc", http=StubTreq(strict))
        self.assertEqual((status, headers.getRawHeaders("Allow")), (405, ["GET"]))

    def test_expected_errors_are_answered_and_others_are_a_logged_500(self) -> None:
        status, body, _ = self.call("GET", "/refused")
        self.assertEqual((status, body), (418, {"error": "refused", "message": "refused"}))
        status, body, _ = self.call("GET", "/broken")
        self.assertEqual((status, body["error"]), (500, "internal_error"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_an_endpoint_may_answer_the_request_itself(self) -> None:
        self.assertEqual(self.call("GET", "/stream")[:2], (200, b"streamed"))

    def test_without_an_authenticator_nobody_passes(self) -> None:
        resource = EndpointResource(endpoints(), nobody, 1024, prefix="/api")
        self.assertEqual(self.call("GET", "/things/1", http=StubTreq(resource))[0], 401)
        self.assertEqual(self.call("GET", "/ids/abc", http=StubTreq(resource))[0], 200)

    def test_declarations_are_checked(self) -> None:
        twice = [*endpoints()[:1], *endpoints()[:1]]
        self.assertRaises(ValueError, EndpointResource, twice, nobody, 1024)
        unnamed = Endpoint("GET", "/x/{y}", "x", "x", "x", echo)
        self.assertRaises(ValueError, EndpointResource, [unnamed], nobody, 1024)


class PublishedSpecTests(SynchronousTestCase):
    def test_the_document_is_served_beside_the_endpoints(self) -> None:
        resource = EndpointResource(endpoints(), callers, 1024, prefix="/api")
        document = openapi_document(
            resource.endpoints, prefix="/api", title="t", version="1", description="d"
        )
        self.assertEqual(sorted(document["paths"])[0], "/api/broken")
        spec = PublishedSpec(resource, "/api/spec.json", document)
        self.assertIs(spec.endpoints, resource.endpoints)
        http = StubTreq(spec)
        for method, status in (("GET", 200), ("HEAD", 200), ("POST", 404)):
            response = self.successResultOf(
                http.request(method, "http://test.invalid/api/spec.json")
            )
            self.assertEqual(response.code, status, method)
        response = self.successResultOf(http.get("http://test.invalid/api/spec.json"))
        self.assertEqual(json.loads(self.successResultOf(http.content(response))), document)
        response = self.successResultOf(http.get("http://test.invalid/api/ids/abc"))
        self.assertEqual(response.code, 200)

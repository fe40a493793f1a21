"""The logic service's HTTP layer: routing, input checks and the published spec."""

from __future__ import annotations

import json
import os

from jsonschema import Draft202012Validator
from sqlalchemy import delete
from sqlalchemy.exc import OperationalError
from twisted.internet.defer import fail
from twisted.trial.unittest import SynchronousTestCase

from cim.http.schema import object_schema
from cim.http.site import Reply
from cim.logic import openapi
from cim.logic.http.api import LogicCall, LogicEndpoint, answer, logic_resource
from cim.storage.database import DatabaseNotRunning
from cim.storage.posts import create_post_txn
from cim.storage.schema import users
from tests.fakes.logic import BASE, LogicHarness, fired

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SpecTests(SynchronousTestCase):
    def test_docs_copy_is_current(self) -> None:
        with open(os.path.join(ROOT, "docs", "openapi.json"), encoding="utf-8") as handle:
            kept = handle.read()
        self.assertEqual(kept, openapi.render(), "docs/openapi.json is stale: run `make openapi`")

    def test_served_spec_equals_the_generated_one(self) -> None:
        h = LogicHarness(self)
        status, served = h.call("GET", "/openapi.json")
        self.assertEqual(status, 200)
        self.assertEqual(served, json.loads(openapi.render()))

    def test_every_schema_is_valid_and_bounded(self) -> None:
        """Unbounded strings and numbers are how fuzzed input turns into a 500."""
        spec = openapi.document()
        problems = []

        def walk(schema: object, where: str) -> None:
            if isinstance(schema, dict):
                kind = schema.get("type")
                unbounded = not {"enum", "maxLength", "pattern"} & schema.keys()
                if kind == "string" and unbounded:
                    problems.append(f"{where}: string without maxLength")
                if kind in ("integer", "number") and "maximum" not in schema:
                    problems.append(f"{where}: {kind} without maximum")
                if kind == "array" and "maxItems" not in schema:
                    problems.append(f"{where}: array without maxItems")
                for key, value in schema.items():
                    walk(value, f"{where}.{key}")
            elif isinstance(schema, list):
                for index, value in enumerate(schema):
                    walk(value, f"{where}[{index}]")

        for path, item in spec["paths"].items():
            for method, operation in item.items():
                where = f"{method.upper()} {path}"
                body = operation.get("requestBody")
                if body is not None:
                    schema = body["content"]["application/json"]["schema"]
                    Draft202012Validator.check_schema(schema)
                    walk(schema, where + " body")
                for parameter in operation.get("parameters", []):
                    walk(parameter["schema"], f"{where} {parameter['name']}")
        self.assertEqual(problems, [])


async def _echo(call: LogicCall) -> Reply:
    return answer(200, {"params": dict(call.params), "query": dict(call.query)})


class RoutingTests(SynchronousTestCase):
    def harness(self) -> LogicHarness:
        h = LogicHarness(self)
        endpoints = [
            LogicEndpoint(
                "GET",
                "/things/{thing}",
                "get_thing",
                "a thing",
                "test",
                _echo,
                params={"thing": {"type": "integer"}},
                query={"limit": {"type": "integer", "minimum": 1, "maximum": 10}},
                authenticated=False,
            ),
            LogicEndpoint(
                "POST",
                "/things",
                "add_thing",
                "add",
                "test",
                _echo,
                body=object_schema({"n": {"type": "integer", "maximum": 5}}, ["n"]),
                authenticated=False,
            ),
        ]
        h.resource = logic_resource(endpoints, h.node.state.sessions, h.accounts.get_user, 1024)
        from treq.testing import StubTreq

        h.http = StubTreq(h.resource)
        return h

    def test_integer_ids_convert_and_bad_ones_are_not_found(self) -> None:
        h = self.harness()
        status, body = h.call("GET", "/things/42?limit=3")
        self.assertEqual((status, body), (200, {"params": {"thing": 42}, "query": {"limit": 3}}))
        for bad in ("0", "abc", "99999999999999999999", "-1"):
            self.assertEqual(h.call("GET", f"/things/{bad}")[0], 404, bad)
        self.assertEqual(h.call("GET", "/things/1?limit=11")[0], 400)
        self.assertEqual(h.call("GET", "/things/1?limit=x")[0], 400)

    def test_wrong_method_unknown_path_and_bad_bodies(self) -> None:
        h = self.harness()
        self.assertEqual(h.call("DELETE", "/things/1")[0], 405)
        self.assertEqual(h.call("GET", "/nothing")[0], 404)
        self.assertEqual(h.call("POST", "/things", body={"n": 6})[0], 400)
        self.assertEqual(h.call("POST", "/things", body={"n": 1, "extra": 1})[0], 400)
        self.assertEqual(h.call("POST", "/things", body=[1])[0], 400)
        self.assertEqual(
            h.call("POST", "/things", raw=b"{", content_type="application/json")[0], 400
        )
        self.assertEqual(h.call("POST", "/things", raw=b"{}", content_type="text/plain")[0], 415)
        self.assertEqual(h.call("POST", "/things", body={"n": 1})[0], 200)


class DatabaseErrorTests(SynchronousTestCase):
    def test_an_account_deleted_in_flight_is_a_409_not_a_500(self) -> None:
        h = LogicHarness(self)
        h.add_user("ann")
        waiting = h.hold(create_post_txn)
        call = h.start("POST", "/posts", "ann", {"text": "hello"})
        fired(h.db.run(lambda c: c.execute(delete(users).where(users.c.name == "ann"))))
        waiting[0]()
        h.flush()
        status, body = fired(call)
        self.assertEqual((status, body["error"]), (409, "conflict"))

    def test_a_database_that_is_down_is_a_503_with_retry_after(self) -> None:
        h = LogicHarness(self)
        h.add_user("ann")
        headers = {"Authorization": f"Bearer {h.token('ann')}"}
        for error in (DatabaseNotRunning(), OperationalError("SELECT 1", {}, Exception("gone"))):
            self.patch(h.db, "run", lambda *args, error=error, **kwargs: fail(error))
            d = h.http.get(BASE + "/me", headers=headers)
            h.flush()
            response = fired(d)
            self.assertEqual(response.code, 503, error)
            self.assertEqual(response.headers.getRawHeaders("Retry-After"), ["5"])


class SuccessStatusTests(SynchronousTestCase):
    def test_extra_success_statuses_are_documented_with_the_same_schema(self) -> None:
        spec = openapi.document()
        responses = spec["paths"]["/api/v1/bindings"]["post"]["responses"]
        self.assertEqual(responses["200"], responses["201"])
        self.assertIn("content", responses["200"])

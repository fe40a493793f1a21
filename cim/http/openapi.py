"""OpenAPI 3.1 documents built from declared endpoints, and a resource that serves one.

The document is made from the same ``Endpoint`` objects the resource routes by, so it
cannot drift from what the server accepts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twisted.web import server
from twisted.web.resource import Resource

from cim.http.endpoints import Endpoint, EndpointResource
from cim.http.schema import ERROR_SCHEMA, MAX_ID
from cim.http.site import json_reply, write_reply
from cim.http.telemetry import name_route

__all__ = ["PublishedSpec", "openapi_document"]

_COMMON_ERRORS = {
    400: "the request is malformed or breaks a rule; `message` says which",
    401: "the bearer token is missing, expired or unknown",
    409: "the request conflicts with the current state (or with a concurrent change: retry)",
    413: "the body is too large",
    415: "the body is not application/json",
    503: "a backend is unreachable; retry after the Retry-After header",
}
_ERROR_TEXT = {
    403: "the caller may not do this",
    404: "no such resource, or not one the caller may see",
    409: "the request conflicts with the current state",
    410: "the resource has expired",
    429: "too many attempts; retry after the Retry-After header",
}


def _operation(endpoint: Endpoint[Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": endpoint.operation_id,
        "summary": endpoint.summary,
        "tags": [endpoint.tag],
    }
    if endpoint.description:
        operation["description"] = endpoint.description
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": _param_schema(schema)}
        for name, schema in endpoint.params.items()
    ]
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": dict(schema)}
        for name, schema in endpoint.query.items()
    ]
    if parameters:
        operation["parameters"] = parameters
    if endpoint.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": dict(endpoint.body)}},
        }
    responses: dict[str, Any] = {}
    if endpoint.status == 204:
        responses["204"] = {"description": "done"}
    else:
        success: dict[str, Any] = {"description": "success"}
        if endpoint.response is not None:
            success["content"] = {"application/json": {"schema": dict(endpoint.response)}}
        for status in (endpoint.status, *endpoint.also):
            responses[str(status)] = success
    errors = dict(_COMMON_ERRORS)
    if endpoint.authenticated:
        errors[429] = "too many calls by this user; retry after the Retry-After header"
    else:
        errors.pop(401)
    if endpoint.body is None:
        errors.pop(413)
        errors.pop(415)
    for status in endpoint.errors:
        errors[status] = _ERROR_TEXT.get(status, "refused")
    if endpoint.params:
        errors.setdefault(404, _ERROR_TEXT[404])
    for status, text in sorted(errors.items()):
        responses[str(status)] = {
            "description": text,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    operation["responses"] = responses
    operation["security"] = [{"bearer": []}] if endpoint.authenticated else []
    return operation


def _param_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    if schema.get("type") == "integer":
        return {"type": "integer", "minimum": 1, "maximum": MAX_ID, **schema}
    return dict(schema)


def openapi_document(
    endpoints: Sequence[Endpoint[Any]],
    *,
    prefix: str,
    title: str,
    version: str,
    description: str,
) -> dict[str, Any]:
    """The OpenAPI 3.1 description of ``endpoints``, served below ``prefix``."""
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        path = paths.setdefault(prefix + endpoint.path, {})
        path[endpoint.method.lower()] = _operation(endpoint)
    tags = sorted({endpoint.tag for endpoint in endpoints})
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "tags": [{"name": tag} for tag in tags],
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


class PublishedSpec(Resource):
    """Declared endpoints with their OpenAPI document at ``path`` (GET and HEAD).

    Every other request goes to the endpoints, so the document's own path answers
    nothing else (as any path no endpoint declares: 404).
    """

    isLeaf = True

    def __init__(
        self, endpoints: EndpointResource[Any], path: str, document: Mapping[str, Any]
    ) -> None:
        super().__init__()
        self._endpoints = endpoints
        self._path = path.encode()
        self.document = document
        self._reply = json_reply(200, document)

    @property
    def endpoints(self) -> list[Endpoint[Any]]:
        return self._endpoints.endpoints

    def render(self, request: server.Request) -> bytes | int:
        if request.path == self._path and request.method in (b"GET", b"HEAD"):
            name_route(request, self._path.decode())
            return write_reply(request, self._reply)
        return self._endpoints.render(request)

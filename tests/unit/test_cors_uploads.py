"""CORS for the file service's chunk uploads: a page on another origin sends each
chunk with Content-MD5 (the file service refuses a chunk without it), so a preflight
must allow that header, or the browser never sends the chunk (the web app, #18)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from cim.http.cors import CorsPolicy

PAGE = "http://127.0.0.1:8083"


class ChunkPreflightTests(SynchronousTestCase):
    def preflight(self, headers: str) -> DummyRequest:
        request = DummyRequest([b"api", b"v1", b"uploads", b"u1", b"chunks", b"0"])
        request.method = b"OPTIONS"
        request.requestHeaders.setRawHeaders(b"origin", [PAGE.encode()])
        request.requestHeaders.setRawHeaders(b"access-control-request-method", [b"PUT"])
        request.requestHeaders.setRawHeaders(b"access-control-request-headers", [headers.encode()])
        answer = CorsPolicy([PAGE]).check(request)
        self.assertIsInstance(answer, Resource)
        assert answer is not None
        answer.render(request)
        return request

    def test_a_chunk_upload_preflight_allows_content_md5(self) -> None:
        request = self.preflight("authorization,content-md5,content-type")
        self.assertEqual(request.responseCode, 204)
        allowed = request.responseHeaders.getRawHeaders(b"access-control-allow-headers")[0]
        names = {name.strip().lower() for name in allowed.split(b",")}
        self.assertTrue({b"authorization", b"content-md5", b"content-type"} <= names)

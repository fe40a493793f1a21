"""The file service's JSON calls: instant upload, chunked uploads, files and deleting.

A client first asks whether the content is already stored (``/files/check``): it
answers a challenge about the bytes, and with the right proof the stored file is its
own at once. Otherwise it creates an upload, puts its chunks (each with its
``Content-MD5``, in any order, again after a failure) and completes it. Every call
is authenticated with the router's token.
"""

from __future__ import annotations

import base64
import binascii

from twisted.web import server

from cim.files.http.bodies import claim_body
from cim.files.store import FileProblem, FileStore, not_found
from cim.http.auth import BearerSessions
from cim.http.endpoints import Call, Endpoint
from cim.http.site import Reply, json_reply
from cim.json_convention import iso_time, present

__all__ = ["Uploads"]


class Uploads:
    def __init__(self, store: FileStore, bearer: BearerSessions) -> None:
        self.store = store
        self.bearer = bearer

    def endpoints(self, file_id: str) -> list[Endpoint[str]]:
        """``file_id``: the regular expression of a file or upload id in a path."""
        ids = {"id": file_id}
        return [
            Endpoint(
                "POST",
                "/api/v1/files/check",
                "check_file",
                "Is this content stored? Then the caller holds it too (instant upload)",
                "uploads",
                self._check,
                json_body=True,
            ),
            Endpoint(
                "GET",
                "/api/v1/files/{id}",
                "describe_file",
                "A file the caller may read: name, size, type and signed URLs",
                "uploads",
                self._describe,
                segments=ids,
            ),
            Endpoint(
                "DELETE",
                "/api/v1/files/{id}",
                "delete_file",
                "Delete a file for the caller; copies sent to others stay theirs",
                "uploads",
                self._delete,
                segments=ids,
            ),
            Endpoint(
                "POST",
                "/api/v1/uploads",
                "create_upload",
                "Start a chunked upload",
                "uploads",
                self._create_upload,
                json_body=True,
            ),
            Endpoint(
                "GET",
                "/api/v1/uploads/{id}",
                "upload_status",
                "An upload's chunks received so far",
                "uploads",
                self._upload_status,
                segments=ids,
            ),
            Endpoint(
                "DELETE",
                "/api/v1/uploads/{id}",
                "abort_upload",
                "Give an upload up; its chunks are deleted",
                "uploads",
                self._abort_upload,
                segments=ids,
            ),
            Endpoint(
                "PUT",
                "/api/v1/uploads/{id}/chunks/{chunk}",
                "put_chunk",
                "One chunk's bytes, with their Content-MD5",
                "uploads",
                self._put_chunk,
                segments={**ids, "chunk": r"\d{1,9}"},
                # Authenticated below, once the spooled body is claimed: from then on
                # its file is ours to store or delete, whatever the answer.
                authenticated=False,
            ),
            Endpoint(
                "POST",
                "/api/v1/uploads/{id}/complete",
                "complete_upload",
                "Assemble the chunks into the stored file",
                "uploads",
                self._complete,
                segments=ids,
            ),
        ]

    async def _check(self, call: Call[str]) -> Reply:
        body = call.body
        answer = await self.store.check(
            call.user, body.get("md5"), body.get("size"), body.get("challenge"), body.get("proof")
        )
        if answer.record is not None:
            return json_reply(
                200, {"exists": True, **self.store.describe(answer.record, call.user)}
            )
        if answer.challenge is not None:
            return json_reply(200, {"challenge": answer.challenge.as_json()})
        return json_reply(200, {"exists": False})

    async def _describe(self, call: Call[str]) -> Reply:
        record = await self.store.readable(call.user, str(call.params["id"]))
        if record is None:
            raise not_found()
        return json_reply(200, self.store.describe(record, call.user))

    async def _delete(self, call: Call[str]) -> Reply:
        deletion = await self.store.delete(call.user, str(call.params["id"]))
        reply: dict[str, object] = {
            "file_id": deletion.file_id,
            "readable": deletion.readable,
            "shared": deletion.shared,
        }
        if deletion.quota_freed_at is not None:
            reply["quota_freed_at"] = iso_time(deletion.quota_freed_at)
        return json_reply(200, reply)

    async def _create_upload(self, call: Call[str]) -> Reply:
        body = call.body
        upload = await self.store.create_upload(
            call.user, body.get("name"), body.get("size"), body.get("md5"), body.get("mime")
        )
        return json_reply(
            201,
            {
                "upload_id": upload.id,
                "chunk_size": upload.chunk_size,
                "chunk_count": upload.chunk_count,
                "name": upload.name,
                "expires_at": iso_time(upload.expires_at),
            },
            ((b"Location", f"/api/v1/uploads/{upload.id}".encode()),),
        )

    async def _upload_status(self, call: Call[str]) -> Reply:
        upload, received = await self.store.upload_status(call.user, str(call.params["id"]))
        return json_reply(
            200,
            present(
                {
                    "upload_id": upload.id,
                    "name": upload.name,
                    "size": upload.size,
                    "md5": upload.md5,
                    "mime": upload.mime,
                    "chunk_size": upload.chunk_size,
                    "chunk_count": upload.chunk_count,
                    "received": received,
                    "expires_at": iso_time(upload.expires_at),
                }
            ),
        )

    async def _abort_upload(self, call: Call[str]) -> Reply:
        await self.store.abort(call.user, str(call.params["id"]))
        return json_reply(200, {"ok": True})

    async def _put_chunk(self, call: Call[str]) -> Reply:
        request = call.request
        upload_id, chunk = str(call.params["id"]), int(call.params["chunk"])
        # Claimed first, so the spooled file is ours to store or delete from here on.
        body = claim_body(request)
        stored = False
        try:
            user = await self.bearer.user(request)
            content_md5 = _content_md5(request)
            stored = True  # store_chunk takes the body over, whatever it decides
            upload, count = await self.store.store_chunk(user, upload_id, chunk, body, content_md5)
        finally:
            if not stored:
                await self.store.discard(body)
        return json_reply(
            200,
            {
                "upload_id": upload.id,
                "chunk": chunk,
                "received": count,
                "chunk_count": upload.chunk_count,
            },
        )

    async def _complete(self, call: Call[str]) -> Reply:
        record = await self.store.complete(call.user, str(call.params["id"]))
        return json_reply(200, self.store.describe(record, call.user))


def _content_md5(request: server.Request) -> bytes:
    header = request.getHeader(b"content-md5")
    if header is None:
        raise FileProblem(
            400, "bad_request", "send the chunk's MD5 in a Content-MD5 header (RFC 1864, base64)"
        )
    try:
        digest = base64.b64decode(header.strip(), validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 16:
        raise FileProblem(400, "bad_request", "Content-MD5 must be the base64 of a 16-byte MD5")
    return digest

"""cim-client send-file, download and delete-file: the file service, with a progress bar.

Every one of them logs in: a file is read and deleted by the users it belongs to.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from cim.json_convention import present
from cim.reactor import ICimReactor
from cim.scripts.group_commands import resolve_group
from cim.scripts.login import router_token, with_timeout
from cim.scripts.output import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ClientExit,
    OutputClosed,
    emit,
    silence,
)

DASH_ID_HINT = "a file id that begins with '-' goes after '--': delete-file -- ID"
"""File ids made before ``cim.files.ids`` drew again may begin with '-'; argparse takes
such a word for an option and reports the id missing, so every usage error says this."""


def add_file_commands(commands: Any) -> None:
    send_file = commands.add_parser(
        "send-file", help="upload a file (resuming an interrupted upload) and send it"
    )
    send_file.add_argument("to", help="the receiving user (or group, with --group)")
    send_file.add_argument("path")
    send_file.add_argument("--group", action="store_true", help="TO names a group")
    send_file.add_argument("--name", help="the name receivers see (default: the file's)")
    send_file.add_argument("--mime", help="the MIME type (default: guessed from the name)")
    send_file.add_argument(
        "--duration", type=float, default=None, help="voice: length in seconds (WAV: measured)"
    )
    send_file.add_argument(
        "--parallel", type=int, default=4, help="chunks in flight at once (default 4)"
    )
    send_file.add_argument(
        "--limit-rate", default="0", help="average upload rate, e.g. 500KiB or 2MiB (per second)"
    )
    send_file.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for ack:N")
    download = commands.add_parser(
        "download", help="download a file from a message's URL (as --user: files are private)"
    )
    download.add_argument("url")
    download.add_argument(
        "-o", "--output", help="file or directory to save to; - writes the file to stdout"
    )
    download.add_argument(
        "-f", "--force", action="store_true", help="replace a file that is already there"
    )
    delete = commands.add_parser(
        "delete-file",
        help="delete a file you uploaded or were sent; the others keep their copies",
        usage_hint=DASH_ID_HINT,
    )
    delete.add_argument(
        "file_id",
        help="the file's id (file_id in send-file and listen); an id made by an older "
        "server may begin with '-': put it after '--' (delete-file -- ID)",
    )


class ProgressBar:
    """A tqdm bar on stderr; tqdm leaves it out when stderr is not a terminal."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._bar: Any = None

    def begin(self, total: int, done: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            initial=done,
            desc=self._label,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            disable=None,
            leave=False,
        )

    def advance(self, count: int) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


async def send_file_command(reactor: ICimReactor, client: Any, options: argparse.Namespace) -> int:
    from cim.client.files import FileClient, FileServiceError, UploadState, voice_duration_ms
    from cim.client.media import media_message
    from cim.config import parse_size

    path = options.path
    if not os.path.isfile(path):
        raise ClientExit(EXIT_USAGE, f"{path}: not a readable file")
    try:
        rate = parse_size(options.limit_rate)
    except ValueError as exc:
        raise ClientExit(EXIT_USAGE, f"--limit-rate: {exc}") from None
    assert client.ticket is not None
    files = FileClient(
        reactor,
        options.files,
        client.ticket.token,
        user=options.user,
        parallel=options.parallel,
        rate_limit=float(rate),
    )
    name = options.name or os.path.basename(path)
    try:
        report = await files.upload(
            path, name=name, mime=options.mime, state=UploadState(), progress=ProgressBar(name)
        )
    except FileServiceError as error:
        error.message = f"upload failed: {error.message}"
        if error.status in (0, 507):
            error.message += "; run the same command again to resume"
        raise
    finally:
        await files.close()
    stored = report.file
    duration_ms = 0
    if options.duration is not None:
        duration_ms = int(options.duration * 1000)
    elif stored.mime.startswith("audio/"):
        duration_ms = voice_duration_ms(path)
    target = await resolve_group(client, options.to) if options.group else options.to
    message = media_message(target, stored, name, options.group, duration_ms)
    result: dict[str, Any] = {
        "file_id": stored.file_id,
        "url": stored.url,
        "thumbnail_url": stored.thumbnail_url,
        "size": stored.size,
        "mime": stored.mime,
        "instant": report.instant,
        "resumed": report.resumed,
        "chunks_sent": report.chunks_sent,
        "chunk_count": report.chunk_count,
        ("group" if options.group else "to"): target,
    }
    outcome = await with_timeout(reactor, client.send_message(message), options.timeout)
    if outcome is None:
        emit(present(result) | {"status": "failed", "reason": "timeout"})
        raise ClientExit(EXIT_FAILED, f"uploaded, but no outcome in {options.timeout:g} s")
    result.update(msg_id=str(outcome.msg_id), status=outcome.status, reason=outcome.reason)
    emit(present(result))
    if outcome.status not in ("delivered", "stored", "accepted"):
        raise ClientExit(EXIT_FAILED, f"uploaded, not delivered: {outcome.reason}")
    return EXIT_OK


async def download_command(reactor: ICimReactor, options: argparse.Namespace) -> int:
    """Download with a login: the server checks the user may read the file."""
    from cim.client.files import FileClient

    router, token = await router_token(reactor, options)
    files = FileClient(reactor, options.files, token, user=options.user)
    try:
        if options.output == "-":
            await _to_stdout(files, options.url)
            return EXIT_OK
        path, size = await files.download(
            options.url, options.output, ProgressBar("download"), overwrite=options.force
        )
    finally:
        await files.close()
        await _logout(router, token)
    emit({"path": path, "size": size})
    return EXIT_OK


async def delete_file_command(reactor: ICimReactor, options: argparse.Namespace) -> int:
    from cim.client.files import FileClient

    router, token = await router_token(reactor, options)
    files = FileClient(reactor, options.files, token, user=options.user)
    try:
        answer = await files.delete(options.file_id)
    finally:
        await files.close()
        await _logout(router, token)
    emit(answer)
    return EXIT_OK


FILE_SERVICE_COMMANDS = {"download": download_command, "delete-file": delete_file_command}
"""Commands that talk to the file service only (a router login, no IM session)."""


async def _logout(router: Any, token: str) -> None:
    from cim.client.router import RouterError

    with contextlib.suppress(RouterError):
        await router.logout(token)


async def _to_stdout(files: Any, url: str) -> None:
    try:
        await files.download_to(url, sys.stdout.buffer, ProgressBar("download"))
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        silence(sys.stdout)
        raise OutputClosed() from None

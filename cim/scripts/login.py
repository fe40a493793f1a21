"""How cim-client logs in, and which exit status each failure on the way gets.

Chat commands open a session (``ChatClient``) with a first-connection deadline, so a
router or node that is not there fails in ``--connect-timeout`` seconds with status 3
instead of retrying for minutes; the logic and file commands log in at the router
only. Wrong passwords, unknown users and refused cipher suites are status 4.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import sys
from typing import Any

from cim.reactor import ICimReactor
from cim.scripts.output import (
    EXIT_FAILED,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ClientExit,
    OutputClosed,
)

REFUSED_HTTP = frozenset((401, 403))
"""HTTP statuses that mean "not you" or "not allowed": exit status 4."""


def password() -> str:
    """From CIM_PASSWORD, else asked on the terminal."""
    given = os.environ.get("CIM_PASSWORD")
    if given is not None:
        return given
    if not sys.stdin.isatty():
        raise ClientExit(
            EXIT_USAGE, "set CIM_PASSWORD or run in a terminal to be asked for the password"
        )
    return getpass.getpass("password: ")


MAIN_DEVICE_COMMANDS = frozenset(("listen", "sync", None))
"""Commands that show this host's device's messages or unread counts (None: the console)."""


def device_of(options: argparse.Namespace) -> str:
    """``--device``, or a stable name from the host: ``cli-HOST`` for the console,
    ``listen`` and ``sync`` (the device whose messages and cursors they show), and
    ``cli-HOST-cmd`` for one-shot commands, so a ``send`` from another shell does not
    replace the console's session (each device has one; docs/protocol.md "Devices")."""
    if getattr(options, "device", None):
        return str(options.device)
    host = socket.gethostname() or "host"
    if getattr(options, "command", None) in MAIN_DEVICE_COMMANDS:
        return f"cli-{host}"[:64]
    return f"cli-{host}"[:60] + "-cmd"


async def online_client(
    reactor: ICimReactor, options: argparse.Namespace, receiving: bool, on_state: Any = None
) -> Any:
    """A ``ChatClient`` online at a node, or ClientExit (3 unreachable, 4 refused).

    A command that prints no received messages does not take any (``receiving``
    False): no catch-up, nothing acknowledged, no cursor moved, so every unread message
    stays unread for the next ``listen`` or console. Those that do take them get each
    conversation's catch-up oldest first (``ordered``), as they print it.
    """
    from cim.client.session import ChatClient, SessionRefused, Unreachable

    client = ChatClient(
        reactor,
        options.router,
        options.user,
        password(),
        device_of(options),
        options.cipher,
        receiving=receiving,
        ordered=True,
        transport=getattr(options, "transport", "tcp"),
    )
    if on_state is not None:
        client.on_state = on_state
    try:
        await client.start(deadline=options.connect_timeout)
    except Unreachable as failure:
        raise ClientExit(EXIT_UNREACHABLE, str(failure)) from None
    except SessionRefused as failure:
        raise ClientExit(EXIT_REFUSED, str(failure)) from None
    return client


async def router_token(reactor: ICimReactor, options: argparse.Namespace) -> tuple[Any, str]:
    """Log in at the router only (logic and file commands): (router, token)."""
    from cim.client.router import RouterClient

    router = RouterClient(reactor, options.router)
    login = router.login(options.user, password(), device_of(options))
    ticket = await with_deadline(
        reactor, login, options.connect_timeout, f"the router at {options.router}"
    )
    return router, ticket.token


async def with_timeout(reactor: ICimReactor, d: Any, timeout: float | None) -> Any:
    """The result, or None if the timeout passed first (the Deferred is cancelled)."""
    from twisted.internet.defer import CancelledError, TimeoutError

    if timeout:
        d.addTimeout(timeout, reactor)
    try:
        return await d
    except (CancelledError, TimeoutError):
        return None


async def with_deadline(reactor: ICimReactor, work: Any, timeout: float, what: str) -> Any:
    """The result of ``work`` (a Deferred or coroutine), or ClientExit(3) naming ``what``
    when it had not answered after ``timeout`` seconds (it is cancelled then)."""
    from twisted.internet.defer import Deferred, ensureDeferred

    waiting = work if isinstance(work, Deferred) else ensureDeferred(work)
    expired: list[bool] = []

    def expire() -> None:
        expired.append(True)
        waiting.cancel()

    timer = reactor.callLater(timeout, expire)
    try:
        return await waiting
    except Exception:
        if expired:  # whatever the cancelled call turned into, the cause is the silence
            raise ClientExit(
                EXIT_UNREACHABLE, f"cannot reach {what}: no answer (gave up after {timeout:g} s)"
            ) from None
        raise
    finally:
        if timer.active():
            timer.cancel()


def exit_for(error: BaseException) -> ClientExit:
    """Any failure as the one line and status cim-client exits with."""
    from twisted.internet.error import ConnectError, ConnectionClosed

    from cim.client.answers import RequestRefused, RequestTimedOut
    from cim.client.files import DestinationExists
    from cim.client.session import SessionFailed, SessionRefused, Unreachable

    if isinstance(error, ClientExit):
        return error
    if isinstance(error, RequestTimedOut):
        return ClientExit(EXIT_UNREACHABLE, f"the node did not answer {error.what}: {error.why}")
    if isinstance(error, RequestRefused):
        return ClientExit(EXIT_FAILED, f"the node refused {error.what}: {error.why}")
    if isinstance(error, OutputClosed):
        return ClientExit(0)
    if isinstance(error, Unreachable):
        return ClientExit(EXIT_UNREACHABLE, str(error))
    if isinstance(error, SessionRefused):
        return ClientExit(EXIT_REFUSED, str(error))
    if isinstance(error, SessionFailed):  # a request made while the connection was down
        return ClientExit(EXIT_UNREACHABLE, f"lost the connection to the node: {error}")
    if isinstance(error, DestinationExists):
        return ClientExit(EXIT_FAILED, f"{error.path} already exists (--force replaces it)")
    status = getattr(error, "status", None)
    if isinstance(status, int) and hasattr(error, "code"):  # a service's refusal
        if status == 0:
            return ClientExit(EXIT_UNREACHABLE, str(error))
        return ClientExit(EXIT_REFUSED if status in REFUSED_HTTP else EXIT_FAILED, str(error))
    if isinstance(error, ConnectionClosed):
        return ClientExit(EXIT_UNREACHABLE, "lost the connection to the node")
    if isinstance(error, ConnectError):
        return ClientExit(EXIT_UNREACHABLE, str(error).strip())
    if isinstance(error, OSError):
        return ClientExit(EXIT_FAILED, str(error))
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return ClientExit(EXIT_FAILED, f"unexpected {type(error).__name__}: {text}".rstrip(": "))

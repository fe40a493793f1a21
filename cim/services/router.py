"""The router: HTTP login and logout, the front door before a client's TCP connection.

Login checks the password, decides a duplicate login, picks the IM node and issues a
token; the client then presents that token in its handshake with the node. Only the
token's hash is stored and nothing secret is ever logged: log lines carry the user,
the peer address and the outcome. A logout also ends what belongs to the device alone
(``signed_out``: its push registration).
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import server

from cim import oplog as oplog_events
from cim.backends.state import REASON_KICKED_BY_ADMIN, REASON_LOGGED_OUT, token_hash
from cim.config import ImConfig, RouterConfig
from cim.http.auth import BearerSessions, invalid_token, state_unavailable
from cim.http.endpoints import Call, Endpoint, EndpointResource
from cim.http.operators import NO_OPERATORS, Operators
from cim.http.schema import whole_number
from cim.http.site import (
    HttpError,
    Reply,
    bounded_site,
    client_host,
    is_local_peer,
    json_reply,
    read_json_object,
    too_many_requests,
)
from cim.http.telemetry import UNOBSERVED, SiteTelemetry
from cim.interfaces import (
    AlreadyLoggedIn,
    INodeRegistry,
    IRouteStore,
    ISessionStore,
    NodeInfo,
    StateUnavailable,
)
from cim.json_convention import iso_time, listing
from cim.limits.policy import LOGINS, NO_LIMITS, RateLimits
from cim.metrics import NodeMetrics
from cim.oplog import OperationLog
from cim.ring import HashRing
from cim.throttle import FailedLoginThrottle

LOGIN_PATH = "/api/v1/login"
LOGOUT_PATH = "/api/v1/logout"
ONLINE_PATH = "/api/v1/online"
KICK_PATH = "/api/v1/admin/kick"
_OPERATOR_ACTIONS = {ONLINE_PATH: "online.list", KICK_PATH: "user.kick"}
"""What the operation log calls each operator endpoint's action."""
MAX_ONLINE_PAGE = 1000
DEFAULT_ONLINE_PAGE = 100
TOKEN_BYTES = 32
DEFAULT_DEVICE = "default"
MAX_DEVICE_LENGTH = 64
MAX_USER_LENGTH = 256
MAX_PASSWORD_LENGTH = 4096

SignedOut = Callable[[str, str, str], Awaitable[Any]]
"""Called with (user, device, peer address) after a device logged out: a logout is
the device signing out, and what belongs to it alone ends with it (cim.push: its
push registration). Not called for a kick, an expiry or a newer login of the device."""

# What each refusal counts as in metrics.logins; anything unlisted is "error".
_OUTCOME_BY_CODE = {
    "body_too_large": "bad_request",
    "unsupported_media_type": "bad_request",
    "bad_request": "bad_request",
    "throttled": "throttled",
    "rate_limited": "throttled",
    "invalid_credentials": "invalid_credentials",
    "too_many_devices": "refused",
    "no_node": "no_node",
    "state_unavailable": "unavailable",
}


class AccountsLike(Protocol):
    def check_password(self, name: str, password: str) -> Deferred[bool]: ...


class NodeChooser:
    """Picks each user's IM node on a consistent-hash ring over the live nodes.

    The ring is rebuilt only when the registry reports a change (design: watcher
    mechanism), never per login.
    """

    def __init__(self, registry: INodeRegistry, virtual_nodes: int) -> None:
        self._virtual_nodes = virtual_nodes
        self._ring = HashRing(registry.live_nodes(), virtual_nodes)
        registry.add_listener(self._nodes_changed)

    def _nodes_changed(self, nodes: list[NodeInfo]) -> None:
        self._ring = HashRing(nodes, self._virtual_nodes)

    def node_for(self, user: str) -> NodeInfo | None:
        return self._ring.node_for(user)


class RouterResource(EndpointResource[str]):
    """POST /api/v1/login and /api/v1/logout; the online list and kicking, for operators.

    Login and logout are not authenticated by the machinery: login is how a token is
    had, and logout ends the session its token names rather than looking it up. The
    online list and kicking are the operators' (``cim.http.operators``): a local peer
    with an admin token, whose name the operation log records with what they did.
    """

    _log = Logger()

    def __init__(
        self,
        config: RouterConfig,
        im_config: ImConfig,
        accounts: AccountsLike,
        sessions: ISessionStore,
        presence: IRouteStore,
        registry: INodeRegistry,
        clock: IReactorTime,
        metrics: NodeMetrics,
        token_bytes: Callable[[int], bytes] = os.urandom,
        oplog: OperationLog | None = None,
        operators: Operators = NO_OPERATORS,
        limits: RateLimits = NO_LIMITS,
        signed_out: SignedOut | None = None,
    ) -> None:
        self._oplog = oplog
        self._signed_out = signed_out
        self._operators = operators
        self._limits = limits
        super().__init__(
            [
                Endpoint(
                    "POST",
                    LOGIN_PATH,
                    "login",
                    "Check a password, pick the user's IM node and issue a token",
                    "sessions",
                    self._login,
                    authenticated=False,
                ),
                Endpoint(
                    "POST",
                    LOGOUT_PATH,
                    "logout",
                    "End the session the bearer token names",
                    "sessions",
                    self._logout,
                    authenticated=False,
                ),
                Endpoint(
                    "GET",
                    ONLINE_PATH,
                    "list_online",
                    "Who is online, a page at a time (an operator, from a local peer)",
                    "operations",
                    self._online_page,
                ),
                Endpoint(
                    "POST",
                    KICK_PATH,
                    "kick",
                    "End a user's session by name (an operator, from a local peer)",
                    "operations",
                    self._kick_user,
                ),
            ],
            self._operator,
            config.max_body_size,
        )
        self._config = config
        self._im_config = im_config
        self._accounts = accounts
        self._sessions = sessions
        self._bearer = BearerSessions(sessions)
        self._presence = presence
        self._registry = registry
        self._chooser = NodeChooser(registry, config.virtual_nodes)
        self._metrics = metrics
        self._token_bytes = token_bytes
        window = config.failed_login_window
        self.user_throttle = FailedLoginThrottle(clock, config.max_failed_logins_per_user, window)
        self.address_throttle = FailedLoginThrottle(
            clock, config.max_failed_logins_per_address, window
        )

    # --- login ------------------------------------------------------------------------

    async def _login(self, call: Call[str]) -> Reply:
        address = call.address
        user: str | None = None
        outcome = "error"
        try:
            user, password, device = self._credentials(call.request)
            reply = await self._authenticate(user, password, device, address)
            outcome = "ok"
            return reply
        except HttpError as error:
            outcome = _OUTCOME_BY_CODE.get(error.code, "error")
            raise
        finally:
            self._metrics.logins[outcome] += 1
            if self._oplog is not None:
                event = oplog_events.LOGIN if outcome == "ok" else oplog_events.LOGIN_FAILED
                self._oplog.emit(event, user=user, peer=address, outcome=outcome)
            self._log.info(
                "login {outcome} for {user!r} from {address}",
                outcome=outcome,
                user=user,
                address=address,
            )

    def _credentials(self, request: server.Request) -> tuple[str, str, str]:
        body = read_json_object(request, self._config.max_body_size)
        user = body.get("user")
        password = body.get("password")
        device = body.get("device", DEFAULT_DEVICE)
        if not isinstance(user, str) or not 1 <= len(user) <= MAX_USER_LENGTH:
            raise HttpError(
                400, "bad_request", f"'user' must be a string of 1 to {MAX_USER_LENGTH} characters"
            )
        if not isinstance(password, str) or len(password) > MAX_PASSWORD_LENGTH:
            raise HttpError(
                400,
                "bad_request",
                f"'password' must be a string of at most {MAX_PASSWORD_LENGTH} characters",
            )
        if (
            not isinstance(device, str)
            or not 1 <= len(device) <= MAX_DEVICE_LENGTH
            or not device.isprintable()
        ):
            raise HttpError(
                400,
                "bad_request",
                f"'device' must be 1 to {MAX_DEVICE_LENGTH} printable characters",
            )
        return user, password, device

    async def _authenticate(self, user: str, password: str, device: str, address: str) -> Reply:
        # Every login costs a password hash: an address gets [limits] logins of them.
        wait = self._limits.take(LOGINS, address)
        if wait > 0:
            raise too_many_requests(
                "rate_limited", "too many logins from your address; try again later", wait
            )
        # Checked before the KDF, so a blocked guesser costs no hashing at all.
        wait = max(self.user_throttle.blocked(user), self.address_throttle.blocked(address))
        if wait > 0:
            raise too_many_requests("throttled", "too many failed logins; try again later", wait)

        # Counted as failures before the KDF answers, so guesses sent at once cannot
        # all pass the check above; a correct password takes its count back.
        self.user_throttle.record_failure(user)
        self.address_throttle.record_failure(address)
        try:
            correct = await self._accounts.check_password(user, password)
        except BaseException:
            self.user_throttle.forgive(user)
            self.address_throttle.forgive(address)
            raise
        if not correct:
            raise HttpError(401, "invalid_credentials", "wrong user name or password")
        # Only this attempt is taken back from the address: clearing the address would
        # let one valid account reset the limit between guesses at other accounts.
        self.address_throttle.forgive(address)
        self.user_throttle.record_success(user)

        node = self._chooser.node_for(user)
        if node is None:
            raise HttpError(503, "no_node", "no IM node is available; try again later")

        token = base64.urlsafe_b64encode(self._token_bytes(TOKEN_BYTES)).rstrip(b"=").decode()
        try:
            record, _ = await self._sessions.create_session(
                token_hash(token),
                user,
                device,
                node.node_id,
                self._config.token_ttl,
                self._config.duplicate_login,
                self._im_config.max_devices_per_user,
            )
        except AlreadyLoggedIn:
            limit = self._im_config.max_devices_per_user
            raise HttpError(
                409,
                "too_many_devices",
                f"{user} is online on {limit} devices already, the most allowed "
                "([im] max_devices_per_user); log out on one of them first",
            ) from None
        except StateUnavailable:
            raise state_unavailable() from None

        im = self._im_config
        where: dict[str, Any] = {"id": node.node_id, "host": node.host, "port": node.port}
        if node.ws_url:
            # The same node's WebSocket gateway, for browsers (docs/protocol.md).
            where["ws_url"] = node.ws_url
        body: dict[str, Any] = {
            "token": token,
            "session_id": record.session_id,
            "user": user,
            "node": where,
            "server_key": base64.b64encode(node.public_key_der).decode(),
            "key_fingerprint": hashlib.sha256(node.public_key_der).hexdigest(),
            "heartbeat_interval": im.heartbeat_interval,
            "heartbeat_timeout": im.effective_heartbeat_timeout,
            "cipher_suites": list(im.cipher_suites),
            "expires_at": iso_time(record.expires_at),
        }
        return json_reply(200, body)

    # --- logout -----------------------------------------------------------------------

    async def _logout(self, call: Call[str]) -> Reply:
        address = call.address
        record = await self._bearer.end_session(call.request, REASON_LOGGED_OUT)
        # Debug, as the node's "connected" line: every CLI command logs in and out, and
        # one info line per command (the login) is what an operator wants to read.
        if record is None:
            self._log.debug("logout refused from {address}: unknown token", address=address)
            raise invalid_token("the bearer token is missing, expired or unknown")
        self._log.debug("logout of {user!r} from {address}", user=record.user, address=address)
        if self._oplog is not None:
            self._oplog.emit(oplog_events.LOGOUT, user=record.user, peer=address)
        if self._signed_out is not None and record.device:
            # The device signed out: what belongs to it alone ends too (its push
            # registration: an account no longer signed in must not wake the phone).
            # The session is over either way; a failure here is logged, not answered.
            try:
                await self._signed_out(record.user, record.device, address)
            except Exception:
                self._log.failure("could not end what the device's logout ends")
        return json_reply(200, {"ok": True})

    # --- operators (cim.http.operators) ------------------------------------------------

    async def _operator(self, request: server.Request) -> str:
        """A local peer with an admin token: its operator's name. A refusal is logged
        in the operation log too, since an auditor asks about those first."""
        address = client_host(request)
        try:
            if not is_local_peer(request):
                raise HttpError(403, "forbidden", "operators' requests answer local peers only")
            return await self._operators.authenticate(request)
        except HttpError as error:
            path = request.path.decode("latin-1")
            self._log.warn(
                "operator request {path} refused from {address}: {code}",
                path=path,
                address=address,
                code=error.code,
            )
            self._operator_did(None, address, _OPERATOR_ACTIONS.get(path, path), "", error.code)
            raise

    def _operator_did(
        self, operator: str | None, address: str, action: str, target: str, outcome: str
    ) -> None:
        if self._oplog is not None:
            self._oplog.emit(
                oplog_events.ADMIN,
                user=operator,
                peer=address,
                action=action,
                target=target,
                outcome=outcome,
            )

    # --- online users (design: 后台监控 获取在线用户数) ----------------------------------

    async def _online_page(self, call: Call[str]) -> Reply:
        request = call.request
        offset = _query_int(request, b"offset", 0, 0, 1 << 31)
        limit = _query_int(request, b"limit", DEFAULT_ONLINE_PAGE, 1, MAX_ONLINE_PAGE)
        try:
            total, users = await self._presence.online_users(offset, limit)
            per_node = await self._presence.online_count_by_node()
            devices = await self._presence.online_devices(users)
        except StateUnavailable:
            raise state_unavailable() from None
        self._operator_did(call.user, call.address, "online.list", "", "ok")
        return json_reply(
            200,
            listing(
                users,
                devices={user: devices[user] for user in users if user in devices},
                total=total,
                nodes=dict(sorted(per_node.items())),
                offset=offset,
                limit=limit,
            ),
        )

    # --- kick (cimctl kick) -----------------------------------------------------------

    async def _kick_user(self, call: Call[str]) -> Reply:
        """End a user's sessions by name (every device's, or one device's), on
        whichever node they are connected."""
        request = call.request
        body = read_json_object(request, self._config.max_body_size)
        user = body.get("user")
        device = body.get("device", "")
        if not isinstance(user, str) or not 1 <= len(user) <= MAX_USER_LENGTH:
            raise HttpError(
                400, "bad_request", f"'user' must be a string of 1 to {MAX_USER_LENGTH} characters"
            )
        if not isinstance(device, str) or len(device) > MAX_DEVICE_LENGTH:
            raise HttpError(
                400, "bad_request", f"'device' must be a string of at most {MAX_DEVICE_LENGTH}"
            )
        target = f"{user}/{device}" if device else user
        try:
            records = await self._sessions.end_user_sessions(user, REASON_KICKED_BY_ADMIN, device)
        except StateUnavailable:
            raise state_unavailable() from None
        address = call.address
        if not records:
            self._log.info(
                "kick of {target!r} by {operator} from {address}: no session",
                target=target,
                operator=call.user,
                address=address,
            )
            self._operator_did(call.user, address, "user.kick", target, "no_session")
            raise HttpError(404, "no_session", f"{target} has no session")
        self._log.info(
            "kicked {target!r} ({devices}) at the request of {operator} from {address}",
            target=target,
            devices=", ".join(f"{r.device} on {r.node_id}" for r in records),
            operator=call.user,
            address=address,
        )
        # The operation log hears of it here (an admin event naming the operator) and
        # from the node that closes the connection (a kick event).
        self._operator_did(call.user, address, "user.kick", target, "ok")
        first = records[0]
        return json_reply(
            200,
            {
                "ok": True,
                "user": user,
                "session_id": first.session_id,
                "node": first.node_id,
                "devices": [
                    {"device": r.device, "session_id": r.session_id, "node": r.node_id}
                    for r in records
                ],
            },
        )


def _query_int(request: server.Request, name: bytes, default: int, low: int, high: int) -> int:
    values = (request.args or {}).get(name)
    if not values:
        return default
    number = whole_number(values[0], name.decode())
    value = low - 1 if number is None else number
    if not low <= value <= high:
        raise HttpError(
            400, "bad_request", f"'{name.decode()}' must be a whole number from {low} to {high}"
        )
    return value


def router_site(
    config: RouterConfig,
    im_config: ImConfig,
    accounts: AccountsLike,
    sessions: ISessionStore,
    presence: IRouteStore,
    registry: INodeRegistry,
    clock: IReactorTime,
    metrics: NodeMetrics,
    token_bytes: Callable[[int], bytes] = os.urandom,
    oplog: OperationLog | None = None,
    operators: Operators = NO_OPERATORS,
    limits: RateLimits = NO_LIMITS,
    telemetry: SiteTelemetry = UNOBSERVED,
    signed_out: SignedOut | None = None,
) -> server.Site:
    root = RouterResource(
        config,
        im_config,
        accounts,
        sessions,
        presence,
        registry,
        clock,
        metrics,
        token_bytes,
        oplog,
        operators,
        limits,
        signed_out,
    )
    return bounded_site(root, config.max_body_size, clock, telemetry, config.cors_origins)

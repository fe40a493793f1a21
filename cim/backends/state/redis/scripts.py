"""The Lua scripts the Redis backend runs, read once from the .lua files next to this module.

Every decision that reads and then writes (duplicate login, marking a connection
offline, rewriting lost state, the expiry sweep) is one script, so Redis applies it
atomically and two nodes racing on the same user cannot both win. Each script is
prelude.lua (shared helpers; ARGV[1] is always the key prefix) followed by its own file,
with the reasons and policy it compares against filled in from cim.backends.state.
The connection runs them by SHA (EVALSHA) and sends the source only when Redis does
not know it yet (NOSCRIPT).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources

from cim.backends.state import (
    REASON_EXPIRED,
    REASON_LOGGED_IN_AGAIN,
    REASON_LOGGED_IN_ELSEWHERE,
    REASON_MOVED,
    REFUSE_NEW,
)


@dataclass(frozen=True)
class Script:
    source: str
    sha: str


def _read(name: str) -> str:
    return (
        resources.files("cim.backends.state.redis")
        .joinpath(f"{name}.lua")
        .read_text(encoding="utf-8")
    )


def load_script(name: str) -> Script:
    """prelude.lua + name.lua, with the placeholders replaced."""
    source = (
        (_read("prelude") + _read(name))
        .replace("$EXPIRED", json.dumps(REASON_EXPIRED))
        .replace("$ELSEWHERE", json.dumps(REASON_LOGGED_IN_ELSEWHERE))
        .replace("$AGAIN", json.dumps(REASON_LOGGED_IN_AGAIN))
        .replace("$MOVED", json.dumps(REASON_MOVED))
        .replace("$REFUSE_NEW", json.dumps(REFUSE_NEW))
    )
    return Script(source, hashlib.sha1(source.encode()).hexdigest())


# sessions
CREATE_SESSION = load_script("create_session")
SESSION_FOR_TOKEN = load_script("session_for_token")
REDEEM_TICKET = load_script("redeem_ticket")
END_SESSION = load_script("end_session")
END_USER_SESSION = load_script("end_user_session")
# routes
MARK_ONLINE = load_script("mark_online")
MARK_OFFLINE = load_script("mark_offline")
ROUTES = load_script("routes")
ONLINE_DEVICES = load_script("online_devices")
ONLINE_USERS = load_script("online_users")
ONLINE_COUNT_BY_NODE = load_script("online_count_by_node")
REFRESH_SESSIONS = load_script("refresh_sessions")
# receipts
REMEMBER_MESSAGE = load_script("remember_message")
RECORD_OUTCOME = load_script("record_outcome")
# sequences
NODE_NUMBER = load_script("node_number")
# housekeeping
SWEEP = load_script("sweep")

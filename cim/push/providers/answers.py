"""Provider answers as outcomes, the same way for every provider: what a status means,
and how long a Retry-After says to wait."""

from __future__ import annotations

import email.utils
from typing import Any

from cim.push.notification import ACCEPTED, FAILED, RETRY, Outcome

__all__ = ["outcome_of_status", "payload_fields", "retry_after_seconds"]


def retry_after_seconds(value: str | bytes | None, now: float) -> float | None:
    """A Retry-After header (seconds, or an HTTP date) as seconds from ``now``."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def outcome_of_status(status: int, reason: str, retry_after: float | None) -> Outcome:
    """2xx accepted; 429 and 5xx retried; any other refusal failed (the caller
    recognises its provider's dead-token answers first)."""
    if 200 <= status < 300:
        return Outcome(ACCEPTED, status, reason)
    if status == 429 or status >= 500:
        return Outcome(RETRY, status, reason, retry_after)
    return Outcome(FAILED, status, reason)


def payload_fields(
    kind: str, conversation: str, seq: int, msg_id: int, badge: int
) -> dict[str, Any]:
    """What every push carries for the app to catch up on opening: never message text."""
    return {
        "kind": kind,
        "conversation": conversation,
        "seq": seq,
        "msg_id": msg_id,
        "badge": badge,
    }

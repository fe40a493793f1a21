"""When a remembered answer is read again: one rule for the message path's caches.

The contact decisions (``cim.logic.contacts_cache``) and the group member lists
(``cim.groups.directory``) each keep an answer for a TTL. Had they let it expire, every
answer of a busy node would expire together, and the next message of each pair or group
would wait for its read, queued behind the timeline copy's transaction on the database
thread: a stall of about 100 ms every 10 s at 1,000 msg/s (docs/benchmarks.md). So an
answer asked for in the last part of its life is read again in the background while it
still answers; an answer nobody asks for still expires at its TTL, and none is ever
used past it.
"""

from __future__ import annotations

__all__ = ["REFRESH_AT", "refresh_due"]

REFRESH_AT = 0.75
"""The share of the TTL after which an answer asked for is read again."""


def refresh_due(age: float, ttl: float) -> bool:
    """Whether an answer of this age, still good, should be read again now."""
    return age >= ttl * REFRESH_AT

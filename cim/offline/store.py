"""Catch-up pages' bounds (design: 离线消息, 方案2): how many messages and bytes a page
of a device's unread messages (``cim.im.catchup``) or of history
(``cim.history.service``) may hold. The messages themselves are in the timelines
(``cim.history.timeline``): one row per message, read past each device's cursor.
"""

from __future__ import annotations

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "PAGE_FRAME_RESERVE", "page_budget"]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
"""The most a page may ask for: one answer frame must stay a reasonable size."""

PAGE_FRAME_RESERVE = 256
"""Bytes of a page's frame that are not its messages: the type byte, the cipher's
tag, the page's own fields (more, next_before, acknowledged, error, request_id)."""


def page_budget(frame_limit: int, announced: int = 0) -> int:
    """Bytes of messages a page may carry: below the node's frame limit and, if the
    client announced a smaller one (``max_bytes``), below that. A message larger than
    the budget still travels, alone in its page."""
    limit = min(frame_limit, announced) if announced else frame_limit
    return max(1, limit - PAGE_FRAME_RESERVE)

"""The Redis backend's sequences facet: numbers no two nodes are ever given twice."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import implementer

from cim.backends.state.redis import scripts
from cim.backends.state.redis.core import RedisCore
from cim.interfaces import ISequenceStore
from cim.message_ids import MAX_NODE_NUMBER


@implementer(ISequenceStore)
class RedisSequenceStore:
    def __init__(self, core: RedisCore) -> None:
        self._core = core

    def node_number(self, node_id: str) -> Deferred[int]:
        d = self._core.eval(scripts.NODE_NUMBER, node_id, str(MAX_NODE_NUMBER))
        return d.addCallback(int)

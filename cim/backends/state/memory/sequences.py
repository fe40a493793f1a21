"""The memory backend's sequences facet: numbers for the one node there is."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from cim.interfaces import ISequenceStore


@implementer(ISequenceStore)
class MemorySequenceStore:
    def node_number(self, node_id: str) -> Deferred[int]:
        # One process, one node: any fixed number is unique.
        return defer.succeed(1)

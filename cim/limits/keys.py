"""Per-key state that forgets idle keys: the memory bound every per-user and
per-address limit shares.

An attacker can invent keys (addresses, user names) faster than any limit refuses
them, so a limit may only remember a key while forgetting it would change an answer,
and never more than ``max_keys`` of them. Keys are kept in the order they were last
touched: the ones that fell idle first sit at the front, where every call drops them
cheaply; past ``max_keys`` the least recently touched key is forgotten first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["IdleKeys"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class IdleKeys(Generic[K, V]):
    """A bounded map from key to state, oldest touch first.

    ``idle(state, now)`` says whether a key's state is worth nothing any more (a
    full bucket, failures all out of their window): such keys are dropped from the
    front on every ``sweep``. A key touched again moves to the back.
    """

    __slots__ = ("_entries", "_idle", "max_keys")

    def __init__(self, max_keys: int, idle: Callable[[V, float], bool]) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be positive")
        self.max_keys = max_keys
        self._idle = idle
        self._entries: OrderedDict[K, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        return self._entries.get(key)

    def touch(self, key: K, state: V) -> None:
        """Remember ``state`` for ``key`` as its newest touch; forget the oldest keys
        beyond ``max_keys``."""
        entries = self._entries
        if key in entries:
            entries.move_to_end(key)
        entries[key] = state
        while len(entries) > self.max_keys:
            entries.popitem(last=False)

    def forget(self, key: K) -> None:
        self._entries.pop(key, None)

    def sweep(self, now: float) -> None:
        """Drop idle keys from the front, up to the first one that is not idle.

        Each key is dropped once, so this costs O(1) per touch however it is spread;
        an idle key behind a busy one waits for a later sweep (or ``max_keys``).
        """
        entries = self._entries
        idle = self._idle
        while entries:
            key, state = next(iter(entries.items()))
            if not idle(state, now):
                return
            del entries[key]

"""The ZooKeeper registry's blocking side: what its znodes hold and the kazoo calls
that claim, withdraw and read them, run on the registry's thread pool.

``ZooKeeperRegistry`` (cim.backends.registry.zookeeper) lives on the reactor thread
and hands these calls to its pool; nothing here touches a Twisted object, so what may
block and what must not stay apart.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError
from kazoo.retry import KazooRetry

from cim.interfaces import NodeIdTaken, NodeInfo

__all__ = ["ZNodes", "decode_node", "encode_node"]

T = TypeVar("T")


def _retry(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a kazoo method, retrying connection hiccups for a few seconds.

    A fresh KazooRetry per call: one shared object counts attempts for every thread
    that uses it at once.
    """
    result: T = KazooRetry(max_tries=5, delay=0.1, max_delay=2.0)(func, *args, **kwargs)
    return result


def encode_node(node: NodeInfo) -> bytes:
    """The znode's data: JSON, so operators can read it with zkCli.sh."""
    fields: dict[str, object] = {
        "id": node.node_id,
        "host": node.host,
        "port": node.port,
        "public_key": base64.b64encode(node.public_key_der).decode("ascii"),
    }
    if node.ws_url:
        fields["ws_url"] = node.ws_url
    return json.dumps(fields, sort_keys=True).encode()


def decode_node(name: str, data: bytes) -> NodeInfo:
    """Parse a znode written by encode_node; ValueError names what is wrong."""
    try:
        fields = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"not JSON: {error}") from None
    if not isinstance(fields, dict):
        raise ValueError("not a JSON object")
    node_id, host, port = fields.get("id"), fields.get("host"), fields.get("port")
    key = fields.get("public_key", "")
    if node_id != name:
        raise ValueError(f"id {node_id!r} does not match the znode name")
    if not isinstance(host, str) or not host:
        raise ValueError("host missing")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"bad port {port!r}")
    if not isinstance(key, str):
        raise ValueError("public_key is not a string")
    ws_url = fields.get("ws_url", "")
    if not isinstance(ws_url, str):
        raise ValueError("ws_url is not a string")
    try:
        key_der = base64.b64decode(key, validate=True)
    except binascii.Error:
        raise ValueError("public_key is not base64") from None
    return NodeInfo(node_id, host, port, key_der, ws_url)


class ZNodes:
    """The blocking side of the registry: kazoo calls on the registry's thread pool,
    plain data in and out, touching nothing of the reactor's.

    Kept apart from ``ZooKeeperRegistry`` (which lives on the reactor thread) so that
    what may block and what must not are two classes, not two halves of one.
    """

    def __init__(
        self, client: Any, hosts: str, path: str, session_timeout: float, connect_timeout: float
    ) -> None:
        self._client = client
        self.hosts = hosts
        self.path = path
        self.session_timeout = session_timeout
        self.connect_timeout = connect_timeout

    def connect_txn(
        self, on_state: Callable[[str], None], on_children: Callable[[list[str]], bool | None]
    ) -> None:
        self._client.add_listener(on_state)
        self._client.start(timeout=self.connect_timeout)
        _retry(self._client.ensure_path, self.path)
        # The first call of the watch function happens here, before this returns.
        self._client.ChildrenWatch(self.path, on_children)

    def close_txn(self, on_state: Callable[[str], None]) -> None:
        self._client.remove_listener(on_state)
        self._client.stop()
        self._client.close()

    def session_id(self) -> int | None:
        client_id = self._client.client_id
        return None if client_id is None else int(client_id[0])

    def claim_txn(self, node: NodeInfo) -> None:
        """Create our ephemeral znode, or accept the one our own session already holds.

        A create retried after a lost reply finds the znode it made itself, so
        ownership (the znode's ephemeralOwner) decides, not mere existence.
        """
        znode = f"{self.path}/{node.node_id}"
        data = encode_node(node)
        waited_for_self = False
        for _ in range(3):
            try:
                _retry(self._client.create, znode, data, ephemeral=True)
                return
            except NodeExistsError:
                pass
            try:
                existing, stat = _retry(self._client.get, znode)
            except NoNodeError:
                continue  # its owner went away between our two calls: try again
            if stat.ephemeralOwner == self.session_id():
                if existing != data:
                    _retry(self._client.set, znode, data, version=stat.version)
                return
            if not waited_for_self and self._is_former_self(node, existing):
                # This node's own registration from before a crash (same address, same
                # key): its session expires within the session timeout, so a restart
                # right after kill -9 waits for that instead of refusing to start.
                waited_for_self = True
                self._wait_gone(znode, self.session_timeout * 1.5 + 2.0)
                continue
            raise NodeIdTaken(self.taken_message(node.node_id, existing))
        raise NodeIdTaken(self.taken_message(node.node_id, b""))

    @staticmethod
    def _is_former_self(node: NodeInfo, existing: bytes) -> bool:
        try:
            other = decode_node(node.node_id, existing)
        except ValueError:
            return False
        return (other.host, other.port, other.public_key_der) == (
            node.host,
            node.port,
            node.public_key_der,
        )

    def _wait_gone(self, znode: str, limit: float) -> None:
        """Block this pool thread until ``znode`` is gone or ``limit`` seconds passed."""
        gone = threading.Event()

        def watch(event: Any) -> None:
            gone.set()

        if _retry(self._client.exists, znode, watch=watch) is None:
            return
        gone.wait(limit)

    def taken_message(self, node_id: str, existing: bytes) -> str:
        try:
            other = decode_node(node_id, existing)
            where = f" by a live node at {other.host}:{other.port}"
        except ValueError:
            where = " by another live node"
        return (
            f"node id {node_id!r} is already registered under {self.path} on ZooKeeper "
            f"{self.hosts}{where}; give this node another [node] id, or, if that node "
            f"has just crashed, wait up to {self.session_timeout:g} s for its session "
            "to expire"
        )

    def withdraw_txn(self, node_id: str) -> None:
        znode = f"{self.path}/{node_id}"
        try:
            _, stat = _retry(self._client.get, znode)
            if stat.ephemeralOwner != self.session_id():
                return  # not ours (anymore): never delete another node's registration
            _retry(self._client.delete, znode, version=stat.version)
        except (NoNodeError, BadVersionError):
            pass

    def read_view_txn(self) -> tuple[list[NodeInfo], list[tuple[str, str]]]:
        """The live nodes sorted by id, and the znodes that could not be parsed."""
        nodes: list[NodeInfo] = []
        broken: list[tuple[str, str]] = []
        for name in sorted(_retry(self._client.get_children, self.path)):
            try:
                data, _ = _retry(self._client.get, f"{self.path}/{name}")
            except NoNodeError:
                continue  # gone since the listing; the watch reports that change too
            try:
                nodes.append(decode_node(name, data))
            except ValueError as error:
                broken.append((name, str(error)))
        return nodes, broken

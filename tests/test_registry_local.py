"""LocalRegistry: the single-node registry the router routes with."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cim.interfaces import INodeRegistry, NodeInfo
from cim.registry.local import LocalRegistry


class LocalRegistryTests(SynchronousTestCase):
    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(INodeRegistry, LocalRegistry()))

    def test_register_and_unregister(self) -> None:
        registry = LocalRegistry()
        self.assertIsNone(registry.local_node)
        self.assertEqual(registry.live_nodes(), [])
        node = NodeInfo("n1", "127.0.0.1", 9000, b"key")
        self.assertIsNone(self.successResultOf(registry.register(node)))
        self.assertEqual(registry.local_node, node)
        self.assertEqual(registry.live_nodes(), [node])
        self.assertIsNone(self.successResultOf(registry.unregister()))
        self.assertIsNone(registry.local_node)
        self.assertEqual(registry.live_nodes(), [])

"""LocalRegistry: the single-node registry the router routes with."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cim.backends.registry import make_registry
from cim.backends.registry.local import LocalRegistry
from cim.config import parse_config
from cim.interfaces import INodeRegistry, NodeInfo


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

    def test_accepting_follows_registration(self) -> None:
        registry = LocalRegistry()
        self.assertFalse(registry.accepting)
        self.successResultOf(registry.start())
        registry.register(NodeInfo("n1", "127.0.0.1", 9000))
        self.assertTrue(registry.accepting)
        registry.unregister()
        self.assertFalse(registry.accepting)

    def test_listeners_get_each_new_view(self) -> None:
        registry = LocalRegistry()
        views: list[list[NodeInfo]] = []
        registry.add_listener(views.append)
        node = NodeInfo("n1", "127.0.0.1", 9000)
        registry.register(node)
        registry.unregister()
        registry.unregister()  # nothing changed: nobody is told
        self.assertEqual(views, [[node], []])

    def test_stop_withdraws_the_node(self) -> None:
        registry = LocalRegistry()
        views: list[list[NodeInfo]] = []
        registry.add_listener(views.append)
        registry.register(NodeInfo("n1", "127.0.0.1", 9000))
        self.assertIsNone(self.successResultOf(registry.stop()))
        self.assertEqual(registry.live_nodes(), [])
        self.assertFalse(registry.accepting)
        self.assertEqual(views[-1], [])

    def test_a_failing_listener_does_not_starve_the_others(self) -> None:
        registry = LocalRegistry()
        views: list[list[NodeInfo]] = []

        def broken(view: list[NodeInfo]) -> None:
            raise RuntimeError("listener bug")

        registry.add_listener(broken)
        registry.add_listener(views.append)
        self.successResultOf(registry.register(NodeInfo("n1", "127.0.0.1", 9000)))
        self.assertEqual(len(views), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class MakeRegistryTests(SynchronousTestCase):
    def test_local_by_default(self) -> None:
        registry = make_registry(parse_config("[node]\nid = n1\n").registry, reactor=None)
        self.assertIsInstance(registry, LocalRegistry)

    def test_zookeeper_backend(self) -> None:
        from cim.backends.registry.zookeeper import ZooKeeperRegistry

        config = parse_config(
            "[node]\nid = n1\n[registry]\nbackend = zookeeper\n"
            "zookeeper_hosts = 10.0.0.5:2181\npath = /a/b\nsession_timeout = 4s\n"
        ).registry
        registry = make_registry(config, reactor=None)
        assert isinstance(registry, ZooKeeperRegistry)
        self.assertEqual(
            (registry.hosts, registry.path, registry.session_timeout),
            ("10.0.0.5:2181", "/a/b", 4.0),
        )

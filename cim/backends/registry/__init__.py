"""Which IM nodes are alive, behind INodeRegistry; the embedded backend knows this node only."""

from __future__ import annotations

from cim.config import RegistryConfig
from cim.interfaces import INodeRegistry
from cim.reactor import ICimReactor


def make_registry(config: RegistryConfig, reactor: ICimReactor) -> INodeRegistry:
    """The backend ``[registry] backend`` names, not yet started."""
    if config.backend == "zookeeper":
        # Imported here so that the embedded default never needs kazoo.
        from cim.backends.registry.zookeeper import ZooKeeperRegistry

        return ZooKeeperRegistry(
            reactor, config.zookeeper_hosts, config.path, config.session_timeout
        )
    from cim.backends.registry.local import LocalRegistry

    return LocalRegistry()

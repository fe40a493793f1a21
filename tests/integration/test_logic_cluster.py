"""The logic service in a cluster: an SOS raised through one node's logic service
reaches a guardian connected to another node at once, and an offline guardian at login.

Two real daemons share Redis, ZooKeeper, RabbitMQ and one database, as in
tests.integration.test_cluster; the guardians are the real client library on the real reactor.
"""

from __future__ import annotations

import json
import time
from typing import Any

import treq
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from cim.accounts.store import BlockingAccountStore
from cim.client.session import ChatClient
from cim.config import AccountsConfig
from cim.im.system import SYSTEM_SENDER
from cim.protocols import cim_pb2
from cim.storage.database import open_engine, upgrade
from cim.storage.schema import bindings
from tests.integration.support.cluster import (
    Cluster,
    chat_client,
    connected_port,
    eventually,
    login_body,
)
from tests.integration.support.daemons import PASSWORD
from tests.integration.test_reliability import shared_broker


def notices(received: list[cim_pb2.Message], event: str) -> list[dict[str, Any]]:
    found = []
    for message in received:
        if message.type == cim_pb2.SYSTEM and getattr(message, "from") == SYSTEM_SENDER:
            notice = json.loads(message.text)
            if notice["event"] == event:
                found.append(notice)
    return found


class SosAcrossNodesTests(TestCase):
    timeout = 300

    def test_sos_reaches_a_guardian_on_another_node_and_one_who_logs_in_later(self) -> None:
        return ensureDeferred(self._sos())

    async def _sos(self) -> None:
        cluster = Cluster(self, count=2, amqp_url=shared_broker(self), logic=True)
        upgrade(cluster.database_url)
        engine = open_engine(cluster.database_url)
        try:
            accounts = BlockingAccountStore(engine, AccountsConfig(scrypt_n=4096), clock=time.time)
            accounts.add_user("watch", PASSWORD, "device")
            for guardian in ("g1", "g2"):
                accounts.add_user(guardian, PASSWORD)
            with engine.begin() as connection:
                for guardian in ("g1", "g2"):
                    connection.execute(
                        bindings.insert().values(
                            device="watch", guardian=guardian, status="active", created_at=1.0
                        )
                    )
        finally:
            engine.dispose()
        cluster.start([])
        clients: dict[str, ChatClient] = {}
        inbox: dict[str, list[cim_pb2.Message]] = {"g1": [], "g2": []}

        def start(user: str) -> Any:
            client = clients[user] = chat_client(cluster, cluster.nodes[0], user)
            client.on_message = inbox[user].append
            self.addCleanup(lambda: ensureDeferred(client.stop(logout=False)))
            return client.start()

        await start("g1")
        g1_port = connected_port(clients["g1"])
        # Raise it through the logic service of the node g1 is NOT connected to.
        other = next(node for node in cluster.nodes if node.im_port != g1_port)
        body = await login_body(other, "watch")
        url = f"http://127.0.0.1:{cluster.logic_ports[other.node_id]}/api/v1/sos"
        response = await treq.post(
            url,
            json={"lat": 52.52, "lon": 13.405, "accuracy_m": 8, "battery": 41},
            headers={"Authorization": f"Bearer {body['token']}"},
            persistent=False,
        )
        answer = await response.json()
        self.assertEqual(response.code, 201, answer)
        took = await eventually(
            lambda: bool(notices(inbox["g1"], "sos.raised")), 10, "g1's SOS notice"
        )
        self.assertLess(took, 10)
        [notice] = notices(inbox["g1"], "sos.raised")
        self.assertEqual((notice["sos"], notice["priority"]), (answer["id"], "high"))
        # g2 was offline: the notice was stored and arrives at login, once.
        await start("g2")
        await eventually(lambda: bool(notices(inbox["g2"], "sos.raised")), 10, "g2's notice")
        [later] = notices(inbox["g2"], "sos.raised")
        self.assertEqual(later["sos"], answer["id"])
        self.assertEqual(len(notices(inbox["g1"], "sos.raised")), 1)

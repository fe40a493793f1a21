"""HashRing: balance and minimal movement (issue 3, acceptance 5)."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from cim.interfaces import NodeInfo
from cim.ring import DEFAULT_VIRTUAL_NODES, HashRing, ring_hash

USERS = [f"user{index}" for index in range(10_000)]
MOVING_USERS = USERS[:4_000]
"""Enough for the movement tests: which users move is decided user by user, and with
4,000 users over at most 11 nodes the largest share stays under 1.2 times the average
(the bound those tests allow is 1.5); the balance test keeps all 10,000."""

# Every example maps 10,000 users, so a handful of examples is already a lot of work;
# hypothesis still varies the node ids and counts between runs.
RING_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    database=None,  # no .hypothesis directory in the checkout; failures print their example
    suppress_health_check=[HealthCheck.too_slow],
)

node_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=24)


def cluster(min_size: int, max_size: int) -> st.SearchStrategy[list[NodeInfo]]:
    return st.lists(node_ids, min_size=min_size, max_size=max_size, unique=True).map(
        lambda ids: [NodeInfo(node_id, "10.0.0.1", 9000 + i) for i, node_id in enumerate(ids)]
    )


def assignment(ring: HashRing, users: list[str] = USERS) -> dict[str, str]:
    result = {}
    for user in users:
        node = ring.node_for(user)
        assert node is not None
        result[user] = node.node_id
    return result


class HashRingTests(SynchronousTestCase):
    def test_empty_ring_has_no_node(self) -> None:
        self.assertIsNone(HashRing([], DEFAULT_VIRTUAL_NODES).node_for("alice"))

    def test_single_node_takes_everyone(self) -> None:
        node = NodeInfo("only", "127.0.0.1", 9000)
        ring = HashRing([node])
        self.assertEqual({ring.node_for(user) for user in USERS[:500]}, {node})

    def test_same_answer_in_every_process_and_release(self) -> None:
        # Routers in other processes (and after an upgrade) must agree, so the hash
        # cannot be Python's salted hash() and the mapping is pinned here.
        self.assertEqual(ring_hash("alice"), 0x4DEAEC0CCE54DA89)
        ring = HashRing([NodeInfo(f"n{i}", "h", 1) for i in range(3)])
        users = ["alice", "bob", "carol", "dave", "erin", "frank"]
        chosen = [ring.node_for(user) for user in users]
        self.assertEqual(
            [node.node_id if node else None for node in chosen],
            ["n1", "n2", "n0", "n1", "n2", "n0"],
        )

    def test_order_and_duplicates_do_not_matter(self) -> None:
        nodes = [NodeInfo(f"n{i}", "h", 9000 + i) for i in range(5)]
        forward = assignment(HashRing(nodes))
        self.assertEqual(assignment(HashRing(list(reversed(nodes)) + nodes[:2])), forward)

    def test_rejects_nonsense(self) -> None:
        self.assertRaises(ValueError, HashRing, [], 0)
        self.assertRaises(ValueError, HashRing, [], 160, 0)

    @RING_SETTINGS
    @given(nodes=cluster(3, 10))
    def test_busiest_node_within_1_3_of_average(self, nodes: list[NodeInfo]) -> None:
        counts = Counter(assignment(HashRing(nodes, DEFAULT_VIRTUAL_NODES)).values())
        average = len(USERS) / len(nodes)
        self.assertEqual(set(counts), {node.node_id for node in nodes})
        self.assertLessEqual(max(counts.values()), 1.3 * average, counts)

    @RING_SETTINGS
    @given(nodes=cluster(4, 11), data=st.data())
    def test_join_moves_about_one_nth_and_only_to_the_newcomer(
        self, nodes: list[NodeInfo], data: st.DataObject
    ) -> None:
        newcomer = data.draw(st.sampled_from(nodes))
        before = assignment(HashRing([node for node in nodes if node != newcomer]), MOVING_USERS)
        after = assignment(HashRing(nodes), MOVING_USERS)
        moved = [user for user in MOVING_USERS if before[user] != after[user]]
        self.assertEqual({after[user] for user in moved}, {newcomer.node_id})
        self.assertLessEqual(len(moved), 1.5 * len(MOVING_USERS) / len(nodes))

    @RING_SETTINGS
    @given(nodes=cluster(4, 11), data=st.data())
    def test_leave_moves_only_the_leavers_users(
        self, nodes: list[NodeInfo], data: st.DataObject
    ) -> None:
        leaver = data.draw(st.sampled_from(nodes))
        before = assignment(HashRing(nodes), MOVING_USERS)
        after = assignment(HashRing([node for node in nodes if node != leaver]), MOVING_USERS)
        moved = [user for user in MOVING_USERS if before[user] != after[user]]
        self.assertEqual({before[user] for user in moved}, {leaver.node_id})
        self.assertEqual(len(moved), sum(1 for owner in before.values() if owner == leaver.node_id))
        self.assertLessEqual(len(moved), 1.5 * len(MOVING_USERS) / len(nodes))

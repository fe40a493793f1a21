"""The committed protocol test vectors must match what the Python implementation does.

Other-language clients (``clients/js``) test against ``tests/vectors/protocol.json``
and the copy in ``docs/protocol.md``; when the protocol changes, this fails until
``python -m tests.vectors.protocol`` regenerates them.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from cim.protocols import cim_pb2
from cim.protocols.crypto import NodeKey
from tests.vectors import protocol


class ProtocolVectorTests(SynchronousTestCase):
    def test_vectors_are_current(self) -> None:
        self.assertEqual(protocol.stale(), [], "run: python -m tests.vectors.protocol")

    def test_sealed_key_opens_to_the_key_material(self) -> None:
        """The one randomised field still decrypts, with the committed key, to the
        key material the vectors name (so a client can check its own sealing)."""
        with open(protocol.JSON_PATH, encoding="utf-8") as handle:
            vectors = json.load(handle)
        key = NodeKey._from_pem(vectors["node_key_pem"].encode(), "vectors")
        self.assertEqual(key.fingerprint.hex(), vectors["key_fingerprint"])
        for session in vectors["sessions"]:
            material = key.unseal(bytes.fromhex(session["sealed_key"]))
            self.assertEqual(material.hex(), session["key_material"])
            parsed = cim_pb2.KeyMaterial.FromString(material)
            self.assertEqual(parsed.token, protocol.TOKEN)
            self.assertEqual(parsed.hello_digest.hex(), session["hello_digest"])

    def test_frames_count_per_direction(self) -> None:
        """Client frames start at counter 0, the node's at 1 (0 was the LoginResult)."""
        with open(protocol.JSON_PATH, encoding="utf-8") as handle:
            frames = json.load(handle)["sessions"][0]["frames"]
        client = [f["n"] for f in frames if f["direction"] == "client_to_node"]
        node = [f["n"] for f in frames if f["direction"] == "node_to_client"]
        self.assertEqual(client, list(range(len(client))))
        self.assertEqual(node, list(range(1, len(node) + 1)))

"""The integration tests' port picker: a port is handed out once per process.

A daemon is given its router, IM and admin ports before it starts; a picker that only
checks that nothing listens on a port handed the same one out twice (a CI run's
``Address already in use`` in test_limits).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.support.services import free_port


class FreePortTests(SynchronousTestCase):
    def test_no_port_is_handed_out_twice(self) -> None:
        ports = [free_port() for _ in range(300)]
        self.assertEqual(len(set(ports)), len(ports))
        self.assertTrue(all(20000 <= port < 32000 for port in ports))

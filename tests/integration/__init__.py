"""The integration suite (`make test-integration`): real daemons, real services, real time.

These tests start twistd, redis-server, RabbitMQ and ZooKeeper nodes, or use the
machine's PostgreSQL, Redis and RabbitMQ. A missing service skips the test, or fails it
when CIM_REQUIRE_SERVICES=1 (CI). Their helpers are in ``tests.integration.support``.
"""

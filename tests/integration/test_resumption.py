"""Resumption against a real daemon (issue #20): real TCP, the router, the node's key.

A device logs in through the router, drops its connection and comes back with the
ticket its LoginResult carried: it resumes (no RSA, no router) and is served; the same
resume hello again is refused; after a logout at the router the next ticket is refused
too, with RESUME_REFUSED, and a full hello with the dead token is refused as before.
"""

from __future__ import annotations

import os

import treq
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from cim.client.connection import ImClientProtocol, LoginRefused
from cim.client.router import LoginTicket
from cim.protocols import cim_pb2
from cim.protocols.handshake import HandshakeRefused, Resumption
from tests.integration.support.cluster import eventually, reactor
from tests.integration.support.daemons import PASSWORD, DaemonProcess
from tests.integration.support.frames import SUITE, FrameClient, login_ticket


async def open_session(
    ticket: LoginTicket, resume: Resumption | None = None
) -> tuple[FrameClient, ImClientProtocol]:
    device = FrameClient(ticket.user, "phone")
    protocol = ImClientProtocol(
        reactor, device, ticket.server_key, ticket.token, "phone", SUITE, (SUITE,), resume=resume
    )
    device.protocol = protocol
    await connectProtocol(HostnameEndpoint(reactor, ticket.node.host, ticket.node.port), protocol)
    await protocol.logged_in
    return device, protocol


class ResumptionTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.daemon = DaemonProcess(os.path.abspath(self.mktemp()))
        for user in ("alice", "bob"):
            added = self.daemon.cimctl("user", "add", user, stdin=PASSWORD + "\n")
            self.assertEqual(added.returncode, 0, added.stderr)
        self.daemon.start()
        self.addCleanup(self.daemon.stop)

    async def assert_resume_refused(self, ticket: LoginTicket, resume: Resumption) -> None:
        try:
            await open_session(ticket, resume)
        except HandshakeRefused as refusal:
            self.assertEqual(refusal.reason, cim_pb2.HandshakeError.RESUME_REFUSED)
            return
        self.fail("the resume hello was taken")

    async def test_reconnect_resumes_replay_and_logout_refused(self) -> None:
        ticket = await login_ticket(self.daemon, "alice", "phone")
        first, protocol = await open_session(ticket)
        self.assertFalse(protocol.resumed)
        resumption = protocol.resumption
        assert resumption is not None
        first.drop()
        await eventually(lambda: first.closed, 10, "the drop")

        second, protocol = await open_session(ticket, resumption)
        self.assertTrue(protocol.resumed)
        # Served like any session: bob's message reaches the resumed device.
        bob_ticket = await login_ticket(self.daemon, "bob", "phone")
        bob, _ = await open_session(bob_ticket)
        bob.post("after resumption", to="alice")
        await eventually(lambda: bool(second.live()), 10, "the message on the resumed device")
        self.assertEqual([m.text for m in second.live()], ["after resumption"])

        # The same ticket again (a replayed resume hello): refused, the session stays.
        await self.assert_resume_refused(ticket, resumption)
        self.assertFalse(second.closed)

        # After a logout the session's next ticket dies with its token.
        following = protocol.resumption
        assert following is not None
        response = await treq.post(
            f"{self.daemon.router_url}/api/v1/logout",
            data=b"{}",
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {ticket.token}",
            },
            persistent=False,
        )
        self.assertEqual(response.code, 200, await treq.text_content(response))
        await eventually(lambda: second.closed, 10, "the logged-out device's connection")
        await self.assert_resume_refused(ticket, following)
        try:
            await open_session(ticket)
        except LoginRefused as refusal:
            self.assertEqual(refusal.status, cim_pb2.LoginResult.INVALID_TOKEN)
        else:
            self.fail("the logged-out token was taken")

"""PUSH_R on the IM connection: the connection's device's push registration.

The same operations as ``/api/v1/devices/me/push`` through the same ``Registrations``
(validation, operation log); the user and the device are the connection's session's,
never anything in the frame. A refusal is ``ok=False`` with the logic service's code.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from cim.im.collaborators import ClientSession, FrameTable, log_failure
from cim.logic.errors import BadInput, LogicError
from cim.protocols import cim_pb2
from cim.push.registrations import PushRegistration, Registrations

__all__ = ["PushRequests", "registration_proto"]

PUSH_A = cim_pb2.PUSH_A


def registration_proto(registration: PushRegistration) -> cim_pb2.PushRegistration:
    return cim_pb2.PushRegistration(
        provider=registration.provider,
        token=registration.token,
        app=registration.app or "",
        locale=registration.locale or "",
    )


class PushRequests:
    """Answers PUSH_R: register (or replace), remove, show."""

    log = Logger()

    def __init__(self, registrations: Registrations) -> None:
        self._registrations = registrations

    def frame_table(self) -> FrameTable:
        return {cim_pb2.PUSH_R: (cim_pb2.PushRequest, self.push_requested)}

    def push_requested(self, session: ClientSession, request: cim_pb2.PushRequest) -> None:
        d = Deferred.fromCoroutine(self.answer(session.record.user, session.record.device, request))
        d.addCallback(lambda reply: session.deliver(PUSH_A, reply))
        d.addErrback(log_failure, self.log, "answer a push request")

    async def answer(
        self, user: str, device: str, request: cim_pb2.PushRequest
    ) -> cim_pb2.PushAnswer:
        """The PUSH_A for a PUSH_R of (user, device); never raises."""
        reply = cim_pb2.PushAnswer(request_id=request.request_id)
        registrations = self._registrations
        op = request.WhichOneof("op")
        try:
            if op == "register":
                wanted = request.register
                stored = await registrations.register(
                    user,
                    device,
                    wanted.provider,
                    wanted.token,
                    wanted.app or None,
                    wanted.locale or None,
                )
                reply.registration.CopyFrom(registration_proto(stored))
                reply.registered = True
            elif op == "remove":
                reply.registered = await registrations.remove(user, device)
            elif op == "show":
                found = await registrations.of_device(user, device)
                if found is not None:
                    reply.registration.CopyFrom(registration_proto(found))
                    reply.registered = True
            else:
                raise BadInput("bad_request", "the request names no push operation")
        except LogicError as refusal:
            return cim_pb2.PushAnswer(
                request_id=request.request_id, error=refusal.code, message=refusal.message
            )
        except Exception:
            self.log.failure("push request {op} from {user} failed", op=op, user=user)
            return cim_pb2.PushAnswer(
                request_id=request.request_id,
                error="internal",
                message="the push request failed on the server; try again",
            )
        reply.ok = True
        return reply

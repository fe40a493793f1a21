"""The refusals the logic features decide, as domain errors.

A feature says *why* it refuses (the input breaks a rule, the caller may not, there is
no such thing...) with a stable machine-readable ``code`` and a ``message`` for people;
how a refusal is told to a client is the HTTP side's business
(``cim.logic.http.api`` maps each kind to its status).
"""

from __future__ import annotations

__all__ = [
    "BadInput",
    "Conflict",
    "Expired",
    "Forbidden",
    "LogicError",
    "NotFound",
    "TooManyAttempts",
]


class LogicError(Exception):
    """A refusal: nothing was changed, and ``message`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class BadInput(LogicError):
    """The input breaks a rule the schema cannot express (a weak password, a bad fence)."""


class Forbidden(LogicError):
    """The caller may not do this (not a guardian, not the author, a device only...)."""


class NotFound(LogicError):
    """No such thing, or not one the caller may see."""


class Conflict(LogicError):
    """The request conflicts with what is stored (a taken name, too many fences)."""


class Expired(LogicError):
    """The thing existed but has expired (a binding code)."""


class TooManyAttempts(LogicError):
    """Throttled: too many failures lately; the caller may try again after ``retry_after``."""

    def __init__(self, code: str, message: str, retry_after: float) -> None:
        super().__init__(code, message)
        self.retry_after = retry_after

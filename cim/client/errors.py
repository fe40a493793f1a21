"""What the client's HTTP calls raise when a cim service says no."""

from __future__ import annotations

__all__ = ["ServiceError", "failure_line"]


class ServiceError(Exception):
    """A service refused (``status`` 4xx/5xx, ``code`` its error code) or could not be
    reached (``status`` 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} ({self.code}, HTTP {self.status})" if self.status else self.message


def failure_line(what: str, error: Exception) -> str:
    """One line for a failed attempt to reach ``what`` ("the router", "the node n1 at
    host:port"); a service's own "cannot reach" errors already name it."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, ServiceError):
        return text if error.status == 0 else f"{what} answered: {text}"
    return f"cannot reach {what}: {text}"

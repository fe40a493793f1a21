"""The ``[push]`` section: waking devices that are not connected (cim.push).

Off by default: a node pushes nothing until an operator names at least one provider
(FCM's service-account key, APNs' .p8 key, or a webhook) and sets ``enabled``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from cim.config.values import (
    ConfigError,
    _opt,
    parse_bool,
    parse_duration,
    parse_int,
    parse_rate,
    parse_str,
)

__all__ = ["PUSH_PROVIDERS", "PushConfig", "parse_url"]

PUSH_PROVIDERS = ("fcm", "apns", "webhook")


def parse_url(raw: str) -> str:
    """An http(s) URL without a trailing slash, or empty."""
    url = raw.strip().rstrip("/")
    if url and not url.startswith(("https://", "http://")):
        raise ValueError("expected an http:// or https:// URL")
    return url


@dataclass(frozen=True)
class PushConfig:
    section: ClassVar[str] = "push"
    enabled: bool = _opt(False, parse_bool)
    # At most one push per device per conversation per window (the badge carries the
    # unread count); an urgent one (SOS) is never collapsed.
    collapse_window: float = _opt(10.0, parse_duration, minimum=0, maximum=3600)
    # A group conversation pushes a member's device at most this often (a busy group
    # is collapsed harder than a 1:1 chat); "off": only collapse_window applies.
    group_rate: float = _opt(2.0 / 60.0, parse_rate, minimum=0)
    # Off: "New message from alice", no text leaves the server. On: a preview of
    # the first 100 characters.
    show_text: bool = _opt(False, parse_bool)
    # A device connected with its app in the background (APP_STATE_R) gets an entry
    # over IM but may never show it: it is pushed unless it acknowledges the entry
    # within this grace (an SOS is pushed at once). 0: pushed like a device away.
    background_grace: float = _opt(5.0, parse_duration, minimum=0, maximum=300)
    # Entries held for a background device's ack at once, on this node; past it they
    # are pushed without waiting.
    background_pending: int = _opt(10000, parse_int, minimum=1, maximum=10_000_000)
    # Pushes waiting for a provider on this node; past it non-urgent ones are dropped
    # (and counted), so a provider that is down never holds messages back.
    queue_size: int = _opt(10000, parse_int, minimum=1, maximum=10_000_000)
    # Requests to the providers in flight at once.
    concurrency: int = _opt(8, parse_int, minimum=1, maximum=1024)
    # Threads for the blocking provider clients (APNs' HTTP/2, FCM's OAuth).
    threads: int = _opt(4, parse_int, minimum=1, maximum=64)
    # How long a provider keeps a non-urgent push for a device that is off.
    ttl: float = _opt(86400.0, parse_duration, minimum=0, maximum=28 * 86400)
    # Each request's own deadline.
    timeout: float = _opt(10.0, parse_duration, minimum=0.1, maximum=300)
    # Retries of a refused (429, 5xx) or failed request wait like every retry in cim
    # (capped exponential with jitter) or the provider's Retry-After; a non-urgent
    # push gives up after max_attempts, an urgent one never does.
    retry_initial: float = _opt(1.0, parse_duration, minimum=0.01, maximum=3600)
    retry_max: float = _opt(300.0, parse_duration, minimum=0.01, maximum=86400)
    max_attempts: int = _opt(5, parse_int, minimum=1, maximum=1000)
    # Firebase Cloud Messaging (HTTP v1): a service-account key file (JSON); the
    # project defaults to the file's project_id.
    fcm_key_file: str = _opt("", parse_str)
    fcm_project: str = _opt("", parse_str)
    fcm_endpoint: str = _opt("https://fcm.googleapis.com", parse_url)
    # Apple Push Notification service, token-based: the .p8 key, its id, the team.
    apns_key_file: str = _opt("", parse_str)
    apns_key_id: str = _opt("", parse_str)
    apns_team_id: str = _opt("", parse_str)
    # The app's bundle id (apns-topic).
    apns_topic: str = _opt("", parse_str)
    # https://api.sandbox.push.apple.com for development builds.
    apns_endpoint: str = _opt("https://api.push.apple.com", parse_url)
    # CA certificates to trust for apns_endpoint instead of the system's (a test server).
    apns_ca_file: str = _opt("", parse_str)
    # An operator's own push service: a JSON POST signed with HMAC-SHA256 (docs/push.md).
    webhook_url: str = _opt("", parse_url)
    webhook_secret_file: str = _opt("", parse_str)

    def validate(self) -> None:
        if self.retry_initial > self.retry_max:
            raise ConfigError(
                "push",
                "retry_initial",
                str(self.retry_initial),
                f"must not exceed retry_max ({self.retry_max:g} s)",
            )
        if self.apns_key_file:
            for key in ("apns_key_id", "apns_team_id", "apns_topic"):
                if not getattr(self, key):
                    raise ConfigError("push", key, "", "required with apns_key_file")
        if self.webhook_url and not self.webhook_secret_file:
            raise ConfigError("push", "webhook_secret_file", "", "required with webhook_url")
        if self.enabled and not self.providers:
            raise ConfigError(
                "push",
                "enabled",
                "true",
                "name a provider: fcm_key_file, apns_key_file or webhook_url",
            )

    @property
    def providers(self) -> tuple[str, ...]:
        """The providers this node can push through."""
        configured = {
            "fcm": bool(self.fcm_key_file),
            "apns": bool(self.apns_key_file),
            "webhook": bool(self.webhook_url),
        }
        return tuple(name for name in PUSH_PROVIDERS if configured[name])

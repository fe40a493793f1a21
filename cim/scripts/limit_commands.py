"""cimctl limits: show, raise (or lower) and reset one user's own rate limits.

The configured limits (``[limits]``) hold for everyone; an operator can give one user
rates of their own (a bot, a service account, a busy shop) for the per-user kinds:
messages, group posts, SOS alarms, posts, logic and file calls. They are stored in
the database and every node reads them within ``[limits] override_refresh``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from cim.accounts.store import NoSuchUser, check_user_name
from cim.config import LimitsConfig
from cim.json_convention import iso_time
from cim.limits.policy import USER_KINDS, configured_rate
from cim.scripts.invocation import EXIT_OK, EXIT_USAGE, CommandFailed, Invocation
from cim.storage.database import open_engine
from cim.storage.limits import (
    UserLimitRow,
    reset_user_limits_txn,
    set_user_limits_txn,
    user_limits_txn,
)

__all__ = ["limits", "limits_arguments"]


@dataclass(frozen=True)
class _Option:
    kind: str
    unit: str
    per: float
    """Seconds of ``unit``: the option's number divided by it is per second."""

    @property
    def rate_dest(self) -> str:
        return f"{self.kind}_per_{self.unit}"

    @property
    def burst_dest(self) -> str:
        return f"{self.kind}_burst"

    @property
    def rate_flag(self) -> str:
        return "--" + self.rate_dest.replace("_", "-")

    @property
    def burst_flag(self) -> str:
        return "--" + self.burst_dest.replace("_", "-")


_OPTIONS = tuple(
    _Option(kind, "minute", 60.0) if kind in ("sos", "posts") else _Option(kind, "second", 1.0)
    for kind in USER_KINDS
)


def limits_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="the user")
    for option in _OPTIONS:
        parser.add_argument(
            option.rate_flag,
            dest=option.rate_dest,
            type=float,
            metavar="N",
            help=f"the user's own {option.kind} rate (0: no limit)",
        )
        names = [option.burst_flag] + (["--burst"] if option.kind == "messages" else [])
        parser.add_argument(
            *names,
            dest=option.burst_dest,
            type=int,
            metavar="N",
            help=f"how many {option.kind} at once" + (" (--burst: the same)" if names[1:] else ""),
        )
    parser.add_argument(
        "--reset", action="store_true", help="back to the configured limits ([limits])"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


def limits(invocation: Invocation) -> int:
    args = invocation.args
    name = args.name
    check_user_name(name)
    config = invocation.config.limits
    changes = _changes(args)
    if args.reset and changes:
        raise CommandFailed("--reset takes no new limits", EXIT_USAGE)
    engine = open_engine(invocation.config.database_url)
    try:
        with engine.begin() as connection:
            rows = user_limits_txn(connection, name)
            if rows is None:
                raise NoSuchUser(name)
            own = {row.kind: row for row in rows}
            if args.reset:
                reset_user_limits_txn(connection, name)
            elif changes:
                rates: dict[str, tuple[float, int]] = {}
                for kind, (per_second, burst) in changes.items():
                    now = own.get(kind)
                    base = configured_rate(config, kind)
                    if per_second is None:
                        per_second = now.per_second if now else base.per_second
                    if burst is None:
                        burst = now.burst if now else base.burst
                    rates[kind] = (per_second, burst)
                set_user_limits_txn(connection, name, rates, time.time())
            own = {row.kind: row for row in user_limits_txn(connection, name) or ()}
    finally:
        engine.dispose()
    if args.reset or changes:
        invocation.record("user.limits", name)
    shown = [_Shown.of(option.kind, own.get(option.kind), config) for option in _OPTIONS]
    if args.json:
        invocation.say_json({"user": name, "items": [item.json() for item in shown]})
        return EXIT_OK
    for item in shown:
        rate = _shown_rate(item.per_second)
        source = "own" if item.own is not None else "configured"
        invocation.say(f"{item.kind:<12} {rate:>10}  burst {item.burst:<10} {source}")
    return EXIT_OK


def _changes(args: argparse.Namespace) -> dict[str, tuple[float | None, int | None]]:
    """kind -> (per second, burst) the options ask for; None where one is not given."""
    changes: dict[str, tuple[float | None, int | None]] = {}
    for option in _OPTIONS:
        rate = getattr(args, option.rate_dest)
        burst = getattr(args, option.burst_dest)
        if rate is not None and not 0 <= rate < 1e9:
            raise CommandFailed(f"{option.rate_flag}: expected 0 (no limit) or more", EXIT_USAGE)
        if burst is not None and not 1 <= burst < 1_000_000_000:
            raise CommandFailed(f"{option.burst_flag}: expected 1 or more", EXIT_USAGE)
        if rate is not None or burst is not None:
            changes[option.kind] = (None if rate is None else rate / option.per, burst)
    return changes


@dataclass(frozen=True)
class _Shown:
    kind: str
    per_second: float
    burst: int
    own: UserLimitRow | None

    @classmethod
    def of(cls, kind: str, own: UserLimitRow | None, config: LimitsConfig) -> _Shown:
        if own is not None:
            return cls(kind, own.per_second, own.burst, own)
        base = configured_rate(config, kind)
        return cls(kind, base.per_second, base.burst, None)

    def json(self) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "kind": self.kind,
            "per_second": self.per_second,
            "burst": self.burst,
            "own": self.own is not None,
        }
        if self.own is not None:
            shown["updated_at"] = iso_time(self.own.updated_at)
        return shown


def _shown_rate(per_second: float) -> str:
    if per_second <= 0:
        return "off"
    if per_second >= 1:
        return f"{per_second:g}/s"
    if per_second * 60 >= 1:
        return f"{per_second * 60:g}/m"
    return f"{per_second * 3600:g}/h"

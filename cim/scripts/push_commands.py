"""cimctl push show USER, and cim-client push register | remove | show.

cimctl reads the database itself (like ``cimctl limits``): an operator answering "why
does alice's phone not ring?" sees which devices are registered, with which provider
and since when. A token is shown by its first characters only: it is enough to tell
two apart, not to push to the device.
"""

from __future__ import annotations

import argparse
from typing import Any

from cim.accounts.store import NoSuchUser, check_user_name
from cim.json_convention import iso_time
from cim.scripts.invocation import EXIT_OK, Invocation
from cim.storage.database import open_engine
from cim.storage.push import PushRegistration, registrations_of_txn
from cim.storage.schema import users

__all__ = ["add_push_commands", "push_call", "push_show", "push_show_arguments"]

TOKEN_SHOWN = 8
"""Characters of a token cimctl shows."""


def push_show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="the user")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _shown(registration: PushRegistration) -> dict[str, Any]:
    shown: dict[str, Any] = {
        "device": registration.device,
        "provider": registration.provider,
        "token": registration.token[:TOKEN_SHOWN] + "...",
        "created_at": iso_time(registration.created_at),
        "updated_at": iso_time(registration.updated_at),
    }
    if registration.app is not None:
        shown["app"] = registration.app
    if registration.locale is not None:
        shown["locale"] = registration.locale
    return shown


def push_show(invocation: Invocation) -> int:
    args = invocation.args
    name = args.name
    check_user_name(name)
    engine = open_engine(invocation.config.database_url)
    try:
        with engine.begin() as connection:
            if connection.execute(users.select().where(users.c.name == name)).first() is None:
                raise NoSuchUser(name)
            found = registrations_of_txn(connection, name)
    finally:
        engine.dispose()
    items = [_shown(registration) for registration in found]
    if args.json:
        invocation.say_json(
            {"user": name, "enabled": invocation.config.push.enabled, "items": items}
        )
        return EXIT_OK
    if not items:
        invocation.say(f"{name} has no push registrations")
    for item in items:
        extra = "".join(f" {key}={item[key]}" for key in ("app", "locale") if key in item)
        invocation.say(
            f"{item['device']:<16} {item['provider']:<8} {item['token']:<12} "
            f"since {item['updated_at']}{extra}"
        )
    return EXIT_OK


# --- cim-client -----------------------------------------------------------------------


def add_push_commands(commands: Any) -> None:
    """cim-client push register --provider P --token T | remove | show."""
    push = commands.add_parser(
        "push",
        help="this device's push registration (logic service); it ends when the device "
        "logs out, so this command does not log out",
    )
    verbs = push.add_subparsers(dest="verb", required=True)
    register = verbs.add_parser("register", help="register or replace this device's token")
    register.add_argument("--provider", required=True, choices=("fcm", "apns", "webhook"))
    register.add_argument("--token", required=True, help="the provider's device token")
    register.add_argument("--app", help="the application id")
    register.add_argument("--locale", help="language of the built-in texts (en, zh-Hans)")
    verbs.add_parser("remove", help="remove this device's registration")
    verbs.add_parser("show", help="this device's registration")


async def push_call(api: Any, options: argparse.Namespace) -> Any:
    """The ``LogicClient`` call of ``cim-client push``."""
    if options.verb == "register":
        return await api.register_push(options.provider, options.token, options.app, options.locale)
    if options.verb == "remove":
        return await api.remove_push()
    return await api.push_registration()

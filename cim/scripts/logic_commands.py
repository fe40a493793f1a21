"""cim-client's logic service commands (docs/logic.md): register, bind, sos, fence,
locate, post, like, unlike, likers; each prints the service's answer as JSON, as it
came: the service writes the same JSON convention as the CLI (docs/protocol.md).
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

from cim.reactor import ICimReactor
from cim.scripts import arguments, login
from cim.scripts.output import EXIT_OK, EXIT_USAGE, ClientExit, emit
from cim.scripts.push_commands import add_push_commands, push_call

LOGIC_DEADLINE = 60.0
"""Seconds a logic call may take: registering runs the password KDF."""

LOGIC_COMMANDS = frozenset(
    ("register", "bind", "sos", "fence", "locate", "post", "like", "unlike", "likers", "push")
)


def add_logic_commands(commands: Any) -> None:
    """Subcommands for the logic service's calls, one verb per call (docs/logic.md)."""
    register = commands.add_parser("register", help="create the --user account (logic service)")
    register.add_argument("--kind", choices=("person", "device"), default="person")
    register.add_argument("--display-name", help="the name others see")

    bind = commands.add_parser("bind", help="bind devices to their guardians")
    bind_verbs = bind.add_subparsers(dest="verb", required=True)
    bind_verbs.add_parser("code", help="(device) a binding code to give a guardian")
    add = bind_verbs.add_parser("add", help="(guardian) bind a device with its code")
    add.add_argument("of_device", metavar="DEVICE")
    add.add_argument("code")
    bind_verbs.add_parser("list", help="your bindings, and requests waiting for you")
    for verb, text in (
        ("approve", "(first guardian) approve a pending request"),
        ("del", "remove a binding or decline a request"),
    ):
        change = bind_verbs.add_parser(verb, help=text)
        change.add_argument("of_device", metavar="DEVICE")
        change.add_argument("guardian")

    add_push_commands(commands)

    sos = commands.add_parser("sos", help="raise, list and acknowledge SOS alarms")
    sos_verbs = sos.add_subparsers(dest="verb", required=True)
    raise_sos = sos_verbs.add_parser("raise", help="(device) raise an alarm where you are")
    position_arguments(raise_sos)
    raise_sos.add_argument("--battery", type=arguments.battery, help="battery percentage, 0-100")
    sos_list = sos_verbs.add_parser("list", help="recent alarms")
    sos_list.add_argument("--device", dest="of_device", help="one device's (default: yours)")
    sos_list.add_argument("--limit", type=arguments.positive)
    for verb, text in (("show", "one alarm"), ("ack", "(guardian) acknowledge an alarm")):
        one = sos_verbs.add_parser(verb, help=text)
        one.add_argument("id", type=arguments.record_id)

    fence = commands.add_parser("fence", help="a device's geofences")
    fence_verbs = fence.add_subparsers(dest="verb", required=True)
    fence_add = fence_verbs.add_parser("add", help="(guardian) add a circle or polygon fence")
    fence_add.add_argument("of_device", metavar="DEVICE")
    fence_add.add_argument("name")
    shape = fence_add.add_mutually_exclusive_group(required=True)
    shape.add_argument("--circle", type=arguments.circle, metavar="LAT,LON,RADIUS_M")
    shape.add_argument("--polygon", type=arguments.point, nargs="+", metavar="LAT,LON")
    fence_list = fence_verbs.add_parser("list", help="a device's fences")
    fence_list.add_argument("of_device", metavar="DEVICE")
    fence_del = fence_verbs.add_parser("del", help="(guardian) delete a fence")
    fence_del.add_argument("of_device", metavar="DEVICE")
    fence_del.add_argument("fence", type=arguments.record_id)

    locate = commands.add_parser("locate", help="report or read positions")
    locate_verbs = locate.add_subparsers(dest="verb", required=True)
    report = locate_verbs.add_parser("report", help="(device) report where you are")
    position_arguments(report)
    report.add_argument(
        "--at", type=arguments.timestamp, help="the fix's time: ISO 8601 or epoch seconds"
    )
    history = locate_verbs.add_parser("list", help="a device's recent positions")
    history.add_argument("of_device", metavar="DEVICE")
    history.add_argument("--since", type=arguments.timestamp)
    history.add_argument("--until", type=arguments.timestamp)
    history.add_argument("--limit", type=arguments.positive)

    post = commands.add_parser("post", help="publish, list, read and delete posts")
    post_verbs = post.add_subparsers(dest="verb", required=True)
    post_add = post_verbs.add_parser("add", help="publish a post")
    post_add.add_argument("text")
    post_add.add_argument("--media-url", help="an http(s) URL, e.g. from send-file")
    post_add.add_argument(
        "--goal", type=arguments.positive, help="likes to collect (you are told once)"
    )
    post_add.add_argument(
        "--family", action="store_true", help="only for the accounts bound to you"
    )
    post_list = post_verbs.add_parser("list", help="posts you can see, newest first")
    post_list.add_argument("--author")
    post_list.add_argument("--before", type=arguments.record_id, help="older than this post id")
    post_list.add_argument("--limit", type=arguments.positive)
    for verb, text in (("show", "one post"), ("del", "delete one of your posts")):
        one = post_verbs.add_parser(verb, help=text)
        one.add_argument("id", type=arguments.record_id)

    for verb, text in (("like", "like a post"), ("unlike", "withdraw your like")):
        commands.add_parser(verb, help=text).add_argument("post", type=arguments.record_id)
    likers = commands.add_parser("likers", help="how many liked a post, and who")
    likers.add_argument("post", type=arguments.record_id)
    likers.add_argument("--limit", type=arguments.positive)
    likers.add_argument("--offset", type=arguments.offset)


def position_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lat", type=arguments.latitude)
    parser.add_argument("lon", type=arguments.longitude)
    parser.add_argument("--accuracy", type=arguments.metres, help="metres")


async def logic_call(api: Any, options: argparse.Namespace) -> Any:
    """Make the subcommand's call on a ``LogicClient``; returns what to print."""
    command, verb = options.command, getattr(options, "verb", None)
    if command == "register":
        return await api.register(
            options.user, login.password(), options.kind, options.display_name
        )
    if command == "bind":
        if verb == "code":
            return await api.binding_code()
        if verb == "add":
            return await api.bind(options.of_device, options.code)
        if verb == "list":
            return await api.bindings()
        if verb == "approve":
            return await api.approve_binding(options.of_device, options.guardian)
        return await api.unbind(options.of_device, options.guardian)
    if command == "push":
        return await push_call(api, options)
    if command == "sos":
        if verb == "raise":
            return await api.raise_sos(options.lat, options.lon, options.accuracy, options.battery)
        if verb == "list":
            return await api.sos_events(options.of_device, options.limit)
        if verb == "show":
            return await api.sos_event(options.id)
        return await api.acknowledge_sos(options.id)
    if command == "fence":
        if verb == "add":
            if options.circle is not None:
                lat, lon, radius = options.circle
                return await api.add_circle_fence(options.of_device, options.name, lat, lon, radius)
            return await api.add_polygon_fence(options.of_device, options.name, options.polygon)
        if verb == "list":
            return await api.fences(options.of_device)
        return await api.delete_fence(options.of_device, options.fence)
    if command == "locate":
        if verb == "report":
            position = {
                "lat": options.lat,
                "lon": options.lon,
                "accuracy_m": options.accuracy,
                "at": options.at,
            }
            return await api.report_positions([position])
        return await api.positions(options.of_device, options.since, options.until, options.limit)
    if command == "post":
        if verb == "add":
            audience = "family" if options.family else None
            return await api.create_post(options.text, options.media_url, options.goal, audience)
        if verb == "list":
            return await api.posts(options.author, options.before, options.limit)
        if verb == "show":
            return await api.post(options.id)
        return await api.delete_post(options.id)
    if command == "like":
        return await api.like(options.post)
    if command == "unlike":
        return await api.unlike(options.post)
    if command == "likers":
        return await api.likers(options.post, options.limit, options.offset)
    raise ClientExit(EXIT_USAGE, f"unknown command {command!r}")


async def logic_command(reactor: ICimReactor, options: argparse.Namespace) -> int:
    """Log in through the router (except to register), make the call, print the answer.

    The login is a session of its own device (``cli-HOST-cmd`` unless ``--device``
    says otherwise), so a ``listen`` or console of the same user goes on.
    """
    from cim.client.logic import LogicClient
    from cim.client.router import RouterError

    router = None
    token = None
    if options.command != "register":
        router, token = await login.router_token(reactor, options)
    api = LogicClient(reactor, options.logic, token)
    try:
        answer = await login.with_deadline(
            reactor,
            logic_call(api, options),
            LOGIC_DEADLINE,
            f"the logic service at {options.logic}",
        )
    finally:
        await api.close()
        # A logout is the device signing out, which ends its push registration
        # (docs/push.md): `push` leaves its session to expire (or to the device's
        # next login) instead.
        if router is not None and token is not None and options.command != "push":
            with contextlib.suppress(RouterError):
                await router.logout(token)
    emit(answer)
    return EXIT_OK

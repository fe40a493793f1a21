"""cim-client recall and edit: change one of your messages (#15).

Each prints one JSON line, the change as ``listen`` prints it on the other devices
(``{"event": "recall", "msg_id": ...}``), and exits 0; a refusal (unknown message,
someone else's, past the window, not a text, already recalled) prints
``{"event": ..., "msg_id": ..., "status": "refused", "reason": ...}`` and exits 4.
"""

from __future__ import annotations

import argparse
from typing import Any

from cim.scripts.arguments import message_id
from cim.scripts.output import EXIT_OK, EXIT_REFUSED, ClientExit, emit
from cim.scripts.records import change_record

__all__ = ["CHANGE_COMMANDS", "add_change_commands", "change_command"]

CHANGE_COMMANDS = frozenset(("recall", "edit"))


def add_change_commands(commands: Any) -> None:
    recall = commands.add_parser(
        "recall",
        help="recall one of your messages (within the node's recall window; a group's "
        "owner or admin: any message of the group)",
    )
    recall.add_argument("msg_id", type=message_id, help="the message's id (as printed)")
    edit = commands.add_parser(
        "edit", help="replace the text of one of your text messages (within the edit window)"
    )
    edit.add_argument("msg_id", type=message_id, help="the message's id (as printed)")
    edit.add_argument("text", help="the new text")


async def change_command(client: Any, options: argparse.Namespace) -> int:
    from cim.client.answers import RequestRefused

    try:
        if options.command == "recall":
            change = await client.recall(options.msg_id)
        else:
            change = await client.edit(options.msg_id, options.text)
    except RequestRefused as refused:
        emit(
            {
                "event": options.command,
                "msg_id": str(options.msg_id),
                "status": "refused",
                "reason": refused.reason or "refused",
            }
        )
        raise ClientExit(EXIT_REFUSED, f"{options.command} refused: {refused.why}") from None
    emit(change_record(change))
    return EXIT_OK

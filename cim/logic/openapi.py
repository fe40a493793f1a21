"""Write the logic service's OpenAPI document: ``python -m cim.logic.openapi [PATH]``.

The daemon serves the same document at /api/v1/openapi.json; this writes it without
starting anything, for docs/openapi.json (``make openapi``) and for client generators.
The features are built with the default ``[logic]`` settings and no backends: building
the endpoint declarations touches none.
"""

from __future__ import annotations

import json
import sys
from typing import Any, cast

from twisted.internet.task import Clock

from cim.config import parse_config
from cim.logic.contacts import ContactBook
from cim.logic.context import NO_GROUP_CACHES, LogicContext
from cim.logic.features import LogicFeatures
from cim.logic.http.api import logic_document
from cim.logic.http.operations import logic_endpoints
from cim.logic.notices import Notices
from cim.push.http import push_endpoints
from cim.push.registrations import Registrations
from cim.storage.contacts import PrivacyDefaults

__all__ = ["document", "main"]


def document() -> dict[str, Any]:
    config = parse_config("[node]\nid = spec\n[logic]\nenabled = true\n")
    clock = Clock()
    absent = cast(Any, None)
    ctx = LogicContext(
        config.logic,
        config.accounts,
        absent,
        absent,
        absent,
        Notices(absent, clock),
        clock,
        NO_GROUP_CACHES,
        ContactBook(absent, clock, PrivacyDefaults()),
    )
    # The daemon serves the push registration (cim.push.http) on the same port.
    push = push_endpoints(Registrations(absent, clock, False, ()))
    return logic_document([*logic_endpoints(LogicFeatures.build(ctx)), *push])


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if args:
        with open(args[0], "w", encoding="utf-8") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

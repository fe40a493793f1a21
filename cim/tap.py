"""twistd glue: ``twistd cim --config etc/cim.ini``."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from cim.config import ConfigError, load_config


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = "Run the cim instant-messaging node described by a configuration file."
    optParameters = [
        ["config", "c", "etc/cim.ini", "Path to the configuration file."],
    ]


def makeService(options: Options) -> IService:
    try:
        config = load_config(options["config"])
    except ConfigError as error:
        # One line, no traceback, non-zero status: SystemExit(str) does all three.
        raise SystemExit(f"cim: {error}") from None
    from twisted.internet import reactor

    from cim.services.daemon import CimDaemon

    return CimDaemon(config, reactor)

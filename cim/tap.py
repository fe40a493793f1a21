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

    def opt_version(self) -> None:
        """Print the cim version (and git commit) with Twisted's, and exit."""
        # Twisted's own --version would name only Twisted: a bug report needs cim's.
        from cim.version import version_string
        from twisted import copyright

        print(f"cim {version_string()}")
        print(f"Twisted {copyright.version}")
        raise SystemExit(0)


def makeService(options: Options) -> IService:
    try:
        config = load_config(options["config"])
    except ConfigError as error:
        # One line, no traceback, non-zero status: SystemExit(str) does all three.
        raise SystemExit(f"cim: {error}") from None
    from cim.logs import DaemonLog
    from cim.reactor import installed_reactor
    from cim.services.daemon import CimDaemon, StartupError

    daemon_log = None
    if not config.log.is_default:
        # twistd's own options (--logfile, --nodaemon) decide where an unset file goes.
        parent = getattr(options, "parent", None) or {}
        try:
            daemon_log = DaemonLog(
                config.log,
                config.node.id,
                twistd_logfile=parent.get("logfile"),
                nodaemon=bool(parent.get("nodaemon", True)),
            )
        except OSError as error:
            raise SystemExit(f"cim: [log] file = {config.log.file!r}: {error.strerror}") from None
    from cim.version import current_build

    try:
        return CimDaemon(config, installed_reactor(), daemon_log=daemon_log, build=current_build())
    except StartupError as error:
        # The node's identity (data directory, key) is read here, like the config.
        raise SystemExit(f"cim: could not start node {config.node.id}: {error}") from None

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
    from cim.reactor import dispatch_without_log_context, installed_reactor
    from cim.services.daemon import CimDaemon, StartupError

    daemon_log = None
    parent = getattr(options, "parent", None) or {}
    # twistd's own observer writes every level, debug included; cim's writes the
    # configured [log] level (info by default) where twistd would have (its --logfile,
    # or stdout with --nodaemon). Only an operator's own twistd --syslog or --logger,
    # with an untouched [log] section, is left to twistd.
    twistd_chosen = bool(parent.get("syslog") or parent.get("logger"))
    if not (config.log.is_default and twistd_chosen):
        try:
            daemon_log = DaemonLog(
                config.log,
                config.node.id,
                twistd_logfile=parent.get("logfile"),
                nodaemon=bool(parent.get("nodaemon", True)),
            )
        except OSError as error:
            where = (
                f"[log] file = {config.log.file!r}"
                if config.log.file
                else f"twistd --logfile={parent.get('logfile')}"
            )
            raise SystemExit(f"cim: {where}: {error.strerror}") from None
    from cim.heap import freeze_startup_heap
    from cim.metrics import ReactorHolds
    from cim.version import current_build

    reactor = installed_reactor()
    holds: ReactorHolds | None = ReactorHolds()
    if not dispatch_without_log_context(reactor, holds):
        holds = None  # not an epoll reactor: nothing times its turns
    try:
        return CimDaemon(
            config,
            reactor,
            reactor_holds=holds,
            daemon_log=daemon_log,
            build=current_build(),
            when_started=freeze_startup_heap,
        )
    except StartupError as error:
        # The node's identity (data directory, key) is read here, like the config.
        raise SystemExit(f"cim: could not start node {config.node.id}: {error}") from None

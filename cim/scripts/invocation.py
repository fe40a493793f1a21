"""What every cimctl subcommand gets: the parsed arguments, the streams, the config
loaded on demand, the exit statuses and the one exception that ends a command."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from sqlalchemy.engine import make_url

from cim.accounts.store import BlockingAccountStore
from cim.config import CimConfig, load_config
from cim.storage.database import open_engine

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

LOCAL_CONFIG = "etc/cim.ini"
SYSTEM_CONFIG = "/etc/cim/cim.ini"


class CommandFailed(Exception):
    """An expected failure: main prints the message as one line and exits with status."""

    def __init__(self, message: str, status: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.status = status


def default_config_path() -> str:
    """The checkout's config when run from one, else the system-wide file."""
    return LOCAL_CONFIG if os.path.exists(LOCAL_CONFIG) else SYSTEM_CONFIG


@dataclass
class Invocation:
    """One run of cimctl: parsed arguments, the streams, and the config loaded on demand."""

    args: argparse.Namespace
    stdin: TextIO
    stdout: TextIO
    stderr: TextIO
    _config: CimConfig | None = field(default=None, repr=False)

    @property
    def config_path(self) -> str:
        return str(self.args.config)

    @property
    def config(self) -> CimConfig:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def say(self, line: str) -> None:
        print(line, file=self.stdout)

    def say_json(self, document: Any) -> None:
        """One JSON document, built in the convention (cim.json_convention)."""
        self.say(json.dumps(document, ensure_ascii=False))

    def admin_token(self) -> tuple[str, str]:
        """(operator, token) for the admin API, from ``[admin] token_file``: the one
        ``--operator`` names, or the file's only token."""
        from cim.http.operators import choose_token, read_tokens

        path = self.config.admin_token_path
        try:
            return choose_token(read_tokens(path), getattr(self.args, "operator", None), path)
        except FileNotFoundError:
            raise CommandFailed(
                f"no admin token: {path} does not exist (cimctl keygen --admin writes one)",
                EXIT_USAGE,
            ) from None
        except OSError as exc:
            raise CommandFailed(
                f"cannot read the admin token file {path}: {exc.strerror} "
                "(run cimctl as the user the node runs as)",
                EXIT_USAGE,
            ) from None
        except ValueError as exc:  # TokenFileError, UnicodeDecodeError
            raise CommandFailed(f"[admin] token_file: {exc}", EXIT_USAGE) from None

    def record(self, action: str, target: str) -> None:
        """An admin action in the operation log (design: 用户的操作日志)."""
        import getpass

        from cim.oplog import ADMIN, OperationLog

        config = self.config
        log = OperationLog(config.operation_log_path, node=config.node.id, clock=time.time)
        try:
            log.emit(ADMIN, user=getpass.getuser(), action=action, target=target)
        finally:
            log.close()

    @contextlib.contextmanager
    def accounts(self) -> Iterator[BlockingAccountStore]:
        engine = open_engine(self.config.database_url)
        try:
            yield BlockingAccountStore(engine, self.config.accounts, clock=time.time)
        finally:
            engine.dispose()


def shown_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")

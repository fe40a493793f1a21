"""The whole configuration: reading the INI file, checking every section, CimConfig."""

from __future__ import annotations

import configparser
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cim.config.backends import (
    ArchiveConfig,
    DatabaseConfig,
    LimitsConfig,
    LogConfig,
    OfflineConfig,
    QueueConfig,
    RegistryConfig,
    StateConfig,
    _hide_password,
)
from cim.config.push import PushConfig
from cim.config.services import (
    AccountsConfig,
    AdminConfig,
    FilesConfig,
    HttpConfig,
    ImConfig,
    LogicConfig,
    NodeConfig,
    RouterConfig,
    WebConfig,
    WsConfig,
)
from cim.config.values import (
    REQUIRED,
    ConfigError,
)

SectionT = TypeVar("SectionT")


@dataclass(frozen=True)
class CimConfig:
    """The whole validated configuration."""

    node: NodeConfig
    router: RouterConfig
    accounts: AccountsConfig
    im: ImConfig
    logic: LogicConfig
    files: FilesConfig
    admin: AdminConfig
    state: StateConfig
    registry: RegistryConfig
    queue: QueueConfig
    database: DatabaseConfig
    offline: OfflineConfig
    archive: ArchiveConfig
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    push: PushConfig = field(default_factory=PushConfig)
    web: WebConfig = field(default_factory=WebConfig)
    ws: WsConfig = field(default_factory=WsConfig)
    path: str = ""

    @property
    def database_url(self) -> str:
        return self.database.url or "sqlite:///" + os.path.join(self.node.data_dir, "cim.db")

    @property
    def rsa_key_path(self) -> str:
        return self.im.rsa_key or os.path.join(self.node.data_dir, "node_key.pem")

    @property
    def operation_log_path(self) -> str | None:
        """Where the operation log goes; None when ``[node] operation_log = off``."""
        value = self.node.operation_log
        if value.lower() in ("off", "none", "false", "no"):
            return None
        return value or os.path.join(self.node.data_dir, "operations.log")

    @property
    def admin_token_path(self) -> str:
        return self.admin.token_file or os.path.join(self.node.data_dir, "admin_token")

    @property
    def retention_days(self) -> float | None:
        """For the timelines' purge: None keeps messages for ever (``retention_days = 0``)."""
        return float(self.archive.retention_days) or None


SECTIONS: tuple[type, ...] = (
    NodeConfig,
    RouterConfig,
    AccountsConfig,
    ImConfig,
    LogicConfig,
    FilesConfig,
    AdminConfig,
    StateConfig,
    RegistryConfig,
    QueueConfig,
    DatabaseConfig,
    OfflineConfig,
    ArchiveConfig,
    LimitsConfig,
    LogConfig,
    HttpConfig,
    PushConfig,
    WebConfig,
    WsConfig,
)


def _parse_section(cls: type[SectionT], values: Mapping[str, str]) -> SectionT:
    section: str = cls.section  # type: ignore[attr-defined]
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        spec = known.get(key)
        if spec is None:
            hint = ", ".join(sorted(known))
            raise ConfigError(section, key, raw, f"unknown key (known keys: {hint})")
        meta = spec.metadata
        try:
            value = meta["parse"](raw)
        except ValueError as exc:
            raise ConfigError(section, key, raw, str(exc)) from None
        if meta["choices"] is not None and value not in meta["choices"]:
            raise ConfigError(section, key, raw, f"expected one of: {', '.join(meta['choices'])}")
        if meta["min"] is not None and value < meta["min"]:
            raise ConfigError(section, key, raw, f"must be at least {meta['min']}")
        if meta["max"] is not None and value > meta["max"]:
            raise ConfigError(section, key, raw, f"must be at most {meta['max']}")
        kwargs[key] = value
    for name, spec in known.items():
        if spec.default is REQUIRED and name not in kwargs:
            raise ConfigError(section, name, None, "required key is missing")
    instance = cls(**kwargs)
    try:
        instance.validate()  # type: ignore[attr-defined]
    except ConfigError as error:
        # validate() sees parsed values (1.0 for "1s"): show the operator what they typed.
        if error.key is not None and error.key in values and error.value is not None:
            error.value = _hide_password(values[error.key])
        raise
    return instance


def parse_config(text: str, path: str = "<string>") -> CimConfig:
    """Parse and validate INI text; raise ConfigError naming the first problem."""
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=("#", ";"), default_section="\0defaults"
    )
    try:
        parser.read_string(text, source=path)
    except configparser.DuplicateOptionError as exc:
        raise ConfigError(exc.section, exc.option, None, "key given twice") from None
    except configparser.DuplicateSectionError as exc:
        raise ConfigError(exc.section, None, None, "section given twice") from None
    except configparser.Error as exc:
        raise ConfigError("", None, None, f"cannot parse {path}: {exc.message}") from None
    by_name = {cls.section: cls for cls in SECTIONS}  # type: ignore[attr-defined]
    for name in parser.sections():
        if name not in by_name:
            raise ConfigError(name, None, None, f"unknown section (known: {', '.join(by_name)})")
    parsed: dict[str, Any] = {
        name: _parse_section(cls, dict(parser[name]) if parser.has_section(name) else {})
        for name, cls in by_name.items()
    }
    config = CimConfig(path=path, **parsed)
    if config.im.enabled and not config.im.advertise:
        _advertise_from_listen(config.im.listen)
    if config.ws.enabled:
        if not config.im.enabled:
            raise ConfigError(
                "ws", "enabled", "true", "the gateway serves the IM node: enable [im] too"
            )
        if not config.ws.advertise and not config.ws.listen.startswith(("tcp:", "ssl:")):
            raise ConfigError(
                "ws",
                "advertise",
                "",
                f"set it: it cannot be derived from listen = {config.ws.listen!r}",
            )
    return config


def _advertise_from_listen(listen: str) -> None:
    if not listen.startswith(("tcp:", "ssl:")):
        raise ConfigError(
            "im", "advertise", "", f"set it: it cannot be derived from listen = {listen!r}"
        )


def load_config(path: str) -> CimConfig:
    """Read a config file; a missing or unreadable file is a ConfigError too."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError("", None, None, f"cannot read {path}: {exc.strerror}") from None
    return parse_config(text, path)

"""Typed configuration: one class per INI section, validated before anything starts.

Every error names the section, the key and the offending value in one line, so an
operator can fix ``etc/cim.ini`` without reading a traceback. ``cimctl check-config``
and the daemon run exactly the same validation.

The parts: ``values`` (the parsers and ConfigError), ``services`` (the sections of the
services), ``backends`` (the sections of the backends and plumbing), ``loading``
(CimConfig, parse_config, load_config), ``push`` (the push providers).
"""

from __future__ import annotations

from cim.config.backends import (
    LOG_FORMATS,
    LOG_LEVELS,
    ArchiveConfig,
    DatabaseConfig,
    LimitsConfig,
    LogConfig,
    OfflineConfig,
    QueueConfig,
    RegistryConfig,
    StateConfig,
)
from cim.config.loading import (
    SECTIONS,
    CimConfig,
    load_config,
    parse_config,
)
from cim.config.push import PUSH_PROVIDERS, PushConfig
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
    parse_base_url,
)
from cim.config.values import (
    KNOWN_SUITES,
    REQUIRED,
    SUITE_CHACHA,
    SUITE_RC4,
    ConfigError,
    parse_bool,
    parse_duration,
    parse_endpoint,
    parse_float,
    parse_host_port,
    parse_int,
    parse_list,
    parse_rate,
    parse_size,
    parse_str,
)

__all__ = [
    "KNOWN_SUITES",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "PUSH_PROVIDERS",
    "REQUIRED",
    "SECTIONS",
    "SUITE_CHACHA",
    "SUITE_RC4",
    "AccountsConfig",
    "AdminConfig",
    "ArchiveConfig",
    "CimConfig",
    "ConfigError",
    "DatabaseConfig",
    "FilesConfig",
    "HttpConfig",
    "ImConfig",
    "LimitsConfig",
    "LogConfig",
    "LogicConfig",
    "NodeConfig",
    "OfflineConfig",
    "PushConfig",
    "QueueConfig",
    "RegistryConfig",
    "RouterConfig",
    "StateConfig",
    "WebConfig",
    "WsConfig",
    "load_config",
    "parse_base_url",
    "parse_bool",
    "parse_config",
    "parse_duration",
    "parse_endpoint",
    "parse_float",
    "parse_host_port",
    "parse_int",
    "parse_list",
    "parse_rate",
    "parse_size",
    "parse_str",
]

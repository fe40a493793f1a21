"""The pieces every table of ``docs/benchmarks.md`` is made of (``bench.report``): a
row of the targets' table, numbers and verdicts as text, and the cells that several
figures share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GROUP_TARGET_US = 30.0
GROUP_TARGET = "<= 30 us (Prosody 188, ejabberd 56, Mosquitto 39)"
EXTERNAL = "PostgreSQL + Redis + RabbitMQ"
FLAT_CPU_RATIO = 1.25
FLAT_RSS_RATIO = 1.10


@dataclass(frozen=True)
class Row:
    figure: str
    measured: str
    target: str
    verdict: str


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _verdict(ok: bool | None) -> str:
    if ok is None:
        return ""
    return "meets" if ok else "MISSES"


def _md_table(headers: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f} %"


def _failed(value: Any) -> bool:
    return isinstance(value, dict) and "error" in value


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(key) == value for key, value in match.items()):
            return row
    return None


def _pair(row: dict[str, Any] | None, first: str, d1: int, second: str, d2: int) -> str:
    if row is None:
        return "(not in this run)"
    return f"{_num(row.get(first), d1)}, {_num(row.get(second), d2)}"


def _latency(row: dict[str, Any] | None) -> str:
    if row is None:
        return "(not in this run)"
    return (
        f"{_num(row['p50_ms'], 2)} / {_num(row['p99_ms'], 2)}, "
        f"{_num(row['daemon_cpu_us_per_message'], 1)}"
    )


def _pull_cell(pull: dict[str, Any] | None) -> str:
    if pull is None:
        return "(not in this run)"
    return (
        f"{pull['wall_seconds']:.2f}, {_num(pull['messages_per_s'])}, "
        f"{_num(pull['daemon_cpu_us_per_message'], 1)}"
    )


def _services(row: dict[str, Any]) -> str:
    value = row.get("services_cpu_us_per_unit")
    return "" if value is None else f" (services +{_num(value, 1)})"


def _busy(row: dict[str, Any], side: str) -> str:
    """A side's own CPU share, and in brackets how busy its core was with everything."""
    return f"{_share(row[f'{side}_cpu_share'])} ({_share(row[f'{side}_core_busy'])})"


def _totals(totals: dict[str, Any]) -> str:
    text = f"{totals['sent']:,} = {totals['delivered']:,} + {totals['failed']:,}"
    for extra in ("accepted", "stored"):
        if totals.get(extra):
            text += f" (+ {totals[extra]:,} {extra})"
    if not totals["consistent"]:
        text += " (INCONSISTENT)"
    if not totals.get("received_matches", True):
        text += f" (but receivers got {totals['received']:,} msg:N)"
    return text

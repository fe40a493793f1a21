"""`make chaos`: the chaos run at full length, its table written into docs/reliability.md.

Runs tests/integration/support/chaos/run.py's ``FULL`` settings (``--quick``: the CI
ones) against private services and real daemons, prints what happened and the table
per fault, and replaces the marked section of docs/reliability.md with the table, the
run's date and the commit it ran on (``--no-docs`` leaves the file alone). Exits 1 when
any fault lost, duplicated, reordered or left unanswered a message.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "reliability.md")
BEGIN = "<!-- chaos:begin (written by make chaos) -->"
END = "<!-- chaos:end -->"


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=30, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{head}-dirty" if git("status", "--porcelain", "--untracked-files=no") else head


def section(report: Any) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    settings = report.settings
    return (
        f"{BEGIN}\n"
        f"Last `make chaos` run: {when}, commit `{commit()}`, settings `{settings.name}` "
        f"(a round every {settings.tick:g} s; node down {settings.node_down:g} s, RabbitMQ "
        f"down {settings.broker_down:g} s, PostgreSQL down {settings.database_down:g} s, "
        f"node stopped {settings.node_paused:g} s; {settings.settle:g} s of traffic after "
        f"each recovery{_refused(settings.refused_fills)}), {report.seconds:.0f} s in all, "
        "clients per node "
        f"{dict(sorted(report.placement.items()))}.\n\n"
        f"{report.table()}\n"
        f"{END}"
    )


def _refused(share: float) -> str:
    return f"; {share:.0%} of gap fills refused throughout" if share else ""


def write_docs(text: str) -> None:
    with open(DOCS, encoding="utf-8") as handle:
        current = handle.read()
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        updated = head + text + tail
    else:
        updated = current.rstrip("\n") + "\n\n## Chaos run (make chaos)\n\n" + text + "\n"
    with open(DOCS, "w", encoding="utf-8") as handle:
        handle.write(updated)


def clean(report: Any) -> bool:
    return not report.unanswered_catch_ups and all(
        not (row.unanswered or row.lost or row.duplicates or row.order_violations)
        for row in report.rows
    )


async def main(reactor: Any, arguments: list[str]) -> None:
    from tests.integration.support.chaos.run import CI, FULL, run
    from tests.integration.support.chaos.world import Scope

    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the CI test's shorter run")
    parser.add_argument("--no-docs", action="store_true", help="leave docs/reliability.md")
    options = parser.parse_args(arguments)
    scope = Scope()
    # Ctrl-C or SIGTERM stops the reactor: every process of the run still goes first
    # (RabbitMQ and PostgreSQL run detached from this process, so nothing else would).
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: Deferred.fromCoroutine(scope.close())
    )
    try:
        report = await run(scope, CI if options.quick else FULL)
    finally:
        await scope.close()
    print(f"\n{report.table()}\n")
    for line in report.events:
        print(line)
    if not options.no_docs:
        write_docs(section(report))
        print(f"\nwritten into {DOCS}")
    if not clean(report):
        raise SystemExit(1)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)  # the tests' support package lives beside bench
    task.react(main, (sys.argv[1:],))

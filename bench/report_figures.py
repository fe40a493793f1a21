"""Figures 3b to 8 of ``docs/benchmarks.md`` (``bench.report``): the steady rate, group
fan-out, offline messages, the external backends and the catch-up, as rows of the
targets' table and as their own sections."""

from __future__ import annotations

from typing import Any

from bench import steady
from bench.report_cells import (
    EXTERNAL,
    GROUP_TARGET,
    GROUP_TARGET_US,
    Row,
    _busy,
    _failed,
    _find,
    _latency,
    _md_table,
    _num,
    _pair,
    _pull_cell,
    _services,
    _verdict,
)


def _steady_rows(results: dict[str, Any]) -> list[Row]:
    """Issue #20's steady 2,000 msg/s on the shipped configuration (bench.steady)."""
    return [Row(*figure) for figure in steady.figures(results.get("steady"))]


def _group_counts_exact(group: dict[str, Any]) -> bool:
    return all(
        row["totals"]["consistent"]
        and row["totals"]["received_matches"]
        and row["totals"]["acknowledged_all"]
        for row in group.get("rates", [])
    )


def _group_rows(group: dict[str, Any] | None, label: str = "4.") -> list[Row]:
    if group is None:
        return [Row(f"{label} group fan-out", "not run", GROUP_TARGET, "")]
    if _failed(group):
        return [Row(f"{label} group fan-out", "FAILED", GROUP_TARGET, group["error"])]
    out = []
    for row in group["rates"]:
        cpu = row["daemon_cpu_us_per_delivery"]
        out.append(
            Row(
                f"{label} group fan-out, {group['members']} members, "
                f"{row['offered_per_s']} msg/s ({_num(row['deliveries_per_s'])} deliveries/s)",
                f"{_num(cpu, 1)} us CPU per delivery, p99 {_num(row['p99_ms'], 1)} ms "
                f"(saturated: {row['saturated'].split(' ')[0]})",
                GROUP_TARGET,
                _verdict(None if cpu is None else cpu <= GROUP_TARGET_US),
            )
        )
    exact = _group_counts_exact(group)
    running = sum(1 for row in group["rates"] if row["totals"].get("still_running"))
    out.append(
        Row(
            f"{label} group counts: received = accepted x {group['receivers_per_message']}, "
            "every msg:N acknowledged",
            f"exact in all {len(group['rates'])} loads"
            if exact
            else "WRONG"
            + (f" (fan-out still running at the drain deadline in {running})" if running else ""),
            "exact",
            _verdict(exact),
        )
    )
    return out


def _offline_ok(offline: dict[str, Any]) -> bool:
    return bool(offline["pull"]["consistent"]) and bool(offline["fill"]["totals"]["consistent"])


def _offline_rows(offline: dict[str, Any] | None, label: str = "5.") -> list[Row]:
    name = f"{label} offline: stored messages pulled by one login"
    if offline is None:
        return [Row(name, "not run", "", "")]
    if _failed(offline):
        return [Row(name, "FAILED", "", offline["error"])]
    pull, fill = offline["pull"], offline["fill"]
    return [
        Row(
            f"{label} offline: {offline['messages']:,} stored messages pulled by one login",
            f"{pull['wall_seconds']:.2f} s, {_num(pull['messages_per_s'])} msg/s, "
            f"{_num(pull['daemon_cpu_us_per_message'], 1)} us CPU/msg",
            "(no target)",
            "",
        ),
        Row(
            f"{label} offline: storing them (msg:R to the offline user, ack:N STORED)",
            f"{_num(fill['stored_per_s'])} msg/s, "
            f"{_num(fill['daemon_cpu_us_per_unit'], 1)} us CPU/msg",
            "(not a target)",
            "",
        ),
        Row(
            f"{label} offline counts: pulled = stored, no duplicates, all acknowledged",
            f"{pull['pulled']:,} = {pull['stored']:,}, {pull['unique']:,} unique, "
            f"{pull['acknowledged']:,} acknowledged, {pull['left_after']} left",
            "exact",
            _verdict(_offline_ok(offline)),
        ),
    ]


def _external_rows(results: dict[str, Any]) -> list[Row]:
    external = results.get("backends")
    name = f"6. {EXTERNAL}"
    if external is None:
        return [Row(name, "not run (make bench-full, or --only backends)", "", "")]
    out: list[Row] = []
    one = external.get("one_to_one", {})
    if _failed(one):
        out.append(Row(f"{name}: 1:1", "FAILED", "", one["error"]))
    embedded = results.get("one_to_one", {})
    for row in one.get("throughput", []):
        base = _find(embedded.get("throughput", []), suite=row["suite"], window=row["window"])
        out.append(
            Row(
                f"6. 1:1 {row['suite']}, window {row['window']}, {EXTERNAL}",
                f"{_num(row['delivered_per_s'])} msg/s, "
                f"{_num(row['daemon_cpu_us_per_message'], 1)} us/msg"
                + (
                    f" (embedded {_num(base['delivered_per_s'])}, "
                    f"{_num(base['daemon_cpu_us_per_message'], 1)})"
                    if base
                    else ""
                ),
                "(side by side)",
                "",
            )
        )
    for row in one.get("latency", []):
        base = _find(embedded.get("latency", []), offered_per_s=row["offered_per_s"])
        out.append(
            Row(
                f"6. latency at {row['offered_per_s']:,} msg/s, {EXTERNAL}",
                f"p99 {_num(row['p99_ms'], 2)} ms, {_num(row['daemon_cpu_us_per_message'], 1)} "
                "us/msg"
                + (
                    f" (embedded p99 {_num(base['p99_ms'], 2)}, "
                    f"{_num(base['daemon_cpu_us_per_message'], 1)})"
                    if base
                    else ""
                ),
                "(side by side)",
                "",
            )
        )
    loads = one.get("throughput", []) + one.get("latency", [])
    if loads:
        bad = [row for row in loads if not row["totals"]["consistent"]]
        failed = sum(row["totals"]["failed"] for row in loads)
        reasons: dict[str, int] = {}
        for row in loads:
            for reason, count in row["totals"]["failure_reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + count
        why = "; ".join(f"{count:,} {reason}" for reason, count in reasons.items())
        out.append(
            Row(
                f"6. 1:1 counts, {EXTERNAL}",
                (f"exact in all {len(loads)} loads" if not bad else f"WRONG in {len(bad)} loads")
                + (f"; {failed:,} failed ({why})" if failed else ""),
                "exact",
                _verdict(not bad),
            )
        )
    out.extend(_group_rows(external.get("group"), f"6. ({EXTERNAL})"))
    out.extend(_offline_rows(external.get("offline"), f"6. ({EXTERNAL})"))
    return out


def _group_details(group: dict[str, Any] | None, title: str = "### 4. Group fan-out") -> list[str]:
    if not group or _failed(group):
        return []
    out = [f"{title} ({group['members']} members)\n"]
    out.append(
        f"One group of {group['members']} members, all connected and logged in (router, "
        "handshake, chacha20-poly1305). The group is created over the protocol: one "
        "member's client sends a GROUP_R create naming the others. "
        f"{group['senders']} of the members post to it at a paced, fixed rate; every "
        f"message reaches the other {group['receivers_per_message']} members as msg:N, "
        "acknowledged cumulatively as the client library does (one ack:R per member "
        "per 32 messages or 0.5 s, naming the conversation and through_seq, which moves "
        "the member's cursor; each answered by ack:A). A group delivery is one member's "
        "msg:N received and acknowledged; the daemon's CPU in the interval is divided by "
        "the msg:N the members received in it (the senders' msg:R, msg:A and ack:N "
        "included). Latency runs from the send stamp to each member's receipt, so it "
        "includes the fan-out's slices (the daemon delivers 100 members per reactor turn) "
        "and the generator's own turn over its 250 members.\n"
    )
    services = any("services_cpu_share" in row for row in group["rates"])
    headers = [
        "offered msg/s",
        "posted",
        "deliveries/s",
        "daemon us/delivery",
        "generator us/delivery",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "daemon (core 0) / generator (core 1) CPU",
        "saturated",
        "accepted x receivers = received (acknowledged)",
    ]
    if services:
        headers.insert(5, "services CPU us/delivery (shared)")
    body = []
    for r in group["rates"]:
        t = r["totals"]
        cells = [
            f"{r['offered_per_s']:,}",
            f"{r['posted']:,}",
            _num(r["deliveries_per_s"]),
            _num(r["daemon_cpu_us_per_delivery"], 1),
            _num(r["generator_cpu_us_per_unit"], 1),
            _num(r["p50_ms"], 2),
            _num(r["p99_ms"], 2),
            _num(r["p999_ms"], 2),
            _num(r["max_ms"], 2),
            f"{_busy(r, 'daemon')} / {_busy(r, 'generator')}",
            r["saturated"],
            f"{t['accepted']:,} x {group['receivers_per_message']} = {t['received']:,} "
            f"({t['acks_answered']:,})"
            + ("" if t["received_matches"] and t["acknowledged_all"] else " (WRONG)")
            + (f", {t['failed']:,} failed" if t["failed"] else ""),
        ]
        if services:
            cells.insert(5, _num(r.get("services_cpu_us_per_unit"), 1))
        body.append(cells)
    out.append(_md_table(headers, body))
    out.append("")
    return out


def _offline_details(
    offline: dict[str, Any] | None, title: str = "### 5. Offline messages"
) -> list[str]:
    if not offline or _failed(offline):
        return []
    pull, fill = offline["pull"], offline["fill"]
    out = [f"{title}\n"]
    out.append(
        f"{offline['senders']} connected clients send {offline['messages']:,} msg:R to a "
        f"user who is not connected (window {offline.get('window', 8)} each), until every one is "
        "answered ack:N STORED and the daemon's database holds them all. With the daemon "
        "idle again, that user logs in (router, handshake) and pulls the way the client "
        "library does: OFFLINE_R pages newest first until `more` is false (each page "
        "parsed in full), then OFFLINE_ACK_R in chunks of 1,000 ids, oldest first, each "
        "answered by OFFLINE_ACK_A. The wall time runs from the router login to the last "
        "OFFLINE_ACK_A; the daemon's CPU over the same span is divided by the messages "
        "pulled.\n"
    )
    services = "services_cpu_share" in pull
    headers = [
        "phase",
        "messages",
        "wall s",
        "msg/s",
        "daemon us/msg",
        "daemon (core 0) / generator (core 1) CPU",
        "saturated",
    ]
    if services:
        headers.insert(5, "services CPU us/msg (shared)")
    rows = [
        [
            "store (msg:R to the offline user, ack:N STORED)",
            f"{fill['totals']['stored']:,}",
            f"{fill['seconds']:.2f}",
            _num(fill["stored_per_s"]),
            _num(fill["daemon_cpu_us_per_unit"], 1),
            f"{_busy(fill, 'daemon')} / {_busy(fill, 'generator')}",
            fill["saturated"],
        ],
        [
            "pull (login to the last OFFLINE_ACK_A)",
            f"{pull['pulled']:,}",
            f"{pull['wall_seconds']:.3f}",
            _num(pull["messages_per_s"]),
            _num(pull["daemon_cpu_us_per_message"], 1),
            f"{_busy(pull, 'daemon')} / {_busy(pull, 'generator')}",
            pull["saturated"],
        ],
    ]
    if services:
        rows[0].insert(5, _num(fill.get("services_cpu_us_per_unit"), 1))
        rows[1].insert(5, _num(pull.get("services_cpu_us_per_unit"), 1))
    out.append(_md_table(headers, rows))
    out.append(
        f"\nThe pull: router login {pull['login_seconds'] * 1000:.1f} ms, handshake "
        f"{pull['handshake_seconds'] * 1000:.1f} ms, {pull['pages']} pages in "
        f"{pull['pull_seconds']:.3f} s, acknowledgements in {pull['ack_seconds']:.3f} s. "
        f"Counts: {pull['pulled']:,} pulled of {pull['stored']:,} stored, "
        f"{pull['unique']:,} distinct ids, {pull['acknowledged']:,} cursors moved, "
        f"{pull['left_after']} left afterwards"
        + ("" if pull["consistent"] else " (INCONSISTENT)")
        + ". The daemon's CPU is read from /proc in 10 ms ticks, so a pull this short "
        "carries a few per cent of rounding.\n"
    )
    return out


def _external_details(results: dict[str, Any]) -> list[str]:
    external = results.get("backends")
    if not external:
        return []
    out = [f"### 6. The same daemon on {EXTERNAL}\n"]
    out.append(
        "The same scenarios, on a daemon with `[state] backend = redis`, `[queue] backend "
        "= rabbitmq` and `[database] url = postgresql://...` (registry: local), on the "
        "machine's own PostgreSQL, Redis and RabbitMQ over loopback. Each scenario's "
        "daemon gets a database of its own (created, migrated, dropped afterwards), an "
        "empty Redis database number (flushed afterwards) and its own exchange, node "
        "queue, offline queue and archive queue (deleted afterwards). 1:1 runs "
        "chacha20-poly1305 only. The daemon's CPU figures are its own, as above; the "
        "services run unpinned and their CPU (every `redis-server`, `beam.smp` and "
        "`postgres` process, which other programs on the machine may be using too) is "
        "shown beside it as an indication. With RabbitMQ, ack:N STORED means the offline "
        "queue has the message; the pull starts once the writer has put all of them in "
        "the database.\n"
    )
    embedded_one = results.get("one_to_one", {})
    one = external.get("one_to_one", {})
    rows: list[list[str]] = []
    for row in one.get("throughput", []) if not _failed(one) else []:
        base = _find(embedded_one.get("throughput", []), suite=row["suite"], window=row["window"])
        rows.append(
            [
                f"1:1 {row['suite']}, {one['pairs']} pairs, window {row['window']}: msg/s, "
                "daemon us/msg",
                _pair(base, "delivered_per_s", 0, "daemon_cpu_us_per_message", 1),
                _pair(row, "delivered_per_s", 0, "daemon_cpu_us_per_message", 1) + _services(row),
            ]
        )
    for row in one.get("latency", []) if not _failed(one) else []:
        base = _find(embedded_one.get("latency", []), offered_per_s=row["offered_per_s"])
        rows.append(
            [
                f"latency at {row['offered_per_s']:,} msg/s: p50 / p99 ms, daemon us/msg",
                _latency(base),
                _latency(row) + _services(row),
            ]
        )
    group, base_group = external.get("group"), results.get("group")
    if group and not _failed(group):
        for row in group["rates"]:
            base = (
                _find(base_group["rates"], offered_per_s=row["offered_per_s"])
                if base_group and not _failed(base_group)
                else None
            )
            rows.append(
                [
                    f"group of {group['members']}, {row['offered_per_s']} msg/s: daemon "
                    "us/delivery, p99 ms",
                    _pair(base, "daemon_cpu_us_per_delivery", 1, "p99_ms", 2),
                    _pair(row, "daemon_cpu_us_per_delivery", 1, "p99_ms", 2) + _services(row),
                ]
            )
    offline, base_offline = external.get("offline"), results.get("offline")
    if offline and not _failed(offline):
        have_base = base_offline is not None and not _failed(base_offline)
        base_pull = base_offline["pull"] if have_base and base_offline else None
        base_fill = base_offline["fill"] if have_base and base_offline else None
        rows.append(
            [
                f"offline pull of {offline['messages']:,}: wall s, msg/s, daemon us/msg",
                _pull_cell(base_pull),
                _pull_cell(offline["pull"]) + _services(offline["pull"]),
            ]
        )
        rows.append(
            [
                "offline store: msg/s, daemon us/msg",
                _pair(base_fill, "stored_per_s", 0, "daemon_cpu_us_per_unit", 1),
                _pair(offline["fill"], "stored_per_s", 0, "daemon_cpu_us_per_unit", 1)
                + _services(offline["fill"]),
            ]
        )
    out.append(_md_table(["figure", "embedded (SQLite, memory)", EXTERNAL], rows))
    out.append("")
    problems = [
        f"{name}: {value['error']}"
        for name, value in external.items()
        if isinstance(value, dict) and _failed(value)
    ]
    if problems:
        out.append("Failed: " + "; ".join(problems) + "\n")
    for name, counts_ok in (
        ("1:1", all(r["totals"]["consistent"] for r in one.get("throughput", []))),
        ("group", bool(group) and not _failed(group) and _group_counts_exact(group or {})),
        ("offline", bool(offline) and not _failed(offline) and _offline_ok(offline or {})),
    ):
        if not counts_ok and name in external and not _failed(external[name]):
            out.append(f"Counts of the {name} scenario on {EXTERNAL} are WRONG; see the JSON.\n")
    out.extend(_group_details(group, f"#### Group fan-out on {EXTERNAL}"))
    out.extend(_offline_details(offline, f"#### Offline messages on {EXTERNAL}"))
    return out


def _catch_up_rows(result: dict[str, Any] | None) -> list[Row]:
    # Imported here: bench.catch_up_report formats with this module's helpers.
    from bench import catch_up_report

    return catch_up_report.rows(result)


def _catch_up_details(result: dict[str, Any] | None) -> list[str]:
    from bench import catch_up_report

    return catch_up_report.details([result] if result else [])

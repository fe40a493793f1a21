"""Turning a run's results into the console table and ``docs/benchmarks.md``.

The document is regenerated whole by every full run, except the hand-written
analysis between the ``ANALYSIS_BEGIN`` and ``ANALYSIS_END`` markers, which is
carried over from the previous file: the numbers change with each run, the reading
of the profile only when someone rereads it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from typing import Any

from bench import distributed, gateway, push_outage
from bench.daemon import BENCH_SCRYPT_N, BENCH_SCRYPT_R, DEFAULT_SCRYPT_N, DEFAULT_SCRYPT_R, ROOT
from bench.report_cells import (
    FLAT_CPU_RATIO,
    FLAT_RSS_RATIO,
    Row,
    _busy,
    _md_table,
    _num,
    _share,
    _totals,
    _verdict,
)
from bench.report_figures import (
    _catch_up_details,
    _catch_up_rows,
    _external_details,
    _external_rows,
    _group_details,
    _group_rows,
    _offline_details,
    _offline_rows,
    _steady_rows,
)

ANALYSIS_BEGIN = "<!-- analysis: hand-written, kept when the tool regenerates this file -->"
ANALYSIS_END = "<!-- /analysis -->"


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare this run with another machine's."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            memory = f"{int(handle.readline().split()[1]) // 1024} MiB"
    except (OSError, ValueError, IndexError):
        pass
    versions = {}
    for package in ("Twisted", "cryptography", "protobuf", "SQLAlchemy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    try:
        from cryptography.hazmat.backends.openssl.backend import backend

        versions["OpenSSL"] = backend.openssl_version_text().removeprefix("OpenSSL ")
    except Exception:
        versions["OpenSSL"] = "unknown"
    try:
        from google.protobuf.internal import api_implementation

        versions["protobuf implementation"] = api_implementation.Type()
    except Exception:
        versions["protobuf implementation"] = "unknown"
    return {
        "cpu": model or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "commit": _git_commit(),
    }


def _git_commit() -> str:
    """HEAD of the checkout; ``BENCH_COMMIT`` names it for a run from an exported tree."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def rows(results: dict[str, Any]) -> list[Row]:
    """Every figure beside its target from issue 6, in the issue's order."""
    out: list[Row] = []
    for idle in results.get("idle", []):
        if "error" in idle:
            out.append(Row(f"1. idle {idle.get('connections')}", "FAILED", "", idle["error"]))
            continue
        n = idle["connections"]
        per = idle["rss_per_connection_kib"]
        out.append(
            Row(
                f"1. idle RSS per connection ({n:,} conns)",
                f"{per:.2f} KiB (socket only {idle['rss_per_connection_socket_only_kib']:.2f})",
                "<= 4 KiB",
                _verdict(per <= 4.0),
            )
        )
        out.append(
            Row(
                f"1. connect+handshake+login rate ({n:,})",
                f"{_num(idle['handshakes_per_s'])}/s",
                "(Prosody 281, ejabberd 685/s)",
                "",
            )
        )
        cpu = idle["handshake_cpu_ms"]
        out.append(
            Row(
                f"1. daemon CPU per IM login handshake ({n:,})",
                f"{cpu:.2f} ms",
                "<= 1.4 ms",
                _verdict(cpu <= 1.4),
            )
        )
        login = idle["router_cpu_ms_per_login"] + cpu
        out.append(
            Row(
                f"1. daemon CPU per login, router + IM handshake ({n:,})",
                f"{login:.2f} ms",
                "<= 0.9 ms",
                _verdict(login <= 0.9),
            )
        )
        if "resume_cpu_ms" in idle:
            resume = idle["resume_cpu_ms"]
            out.append(
                Row(
                    f"1. daemon CPU per resumed handshake, ticket, no RSA ({n:,})",
                    f"{resume:.2f} ms ({_num(idle['resumptions_per_s'])}/s)",
                    "<= 0.3 ms",
                    _verdict(resume <= 0.3),
                )
            )
        out.append(
            Row(
                f"1. router login, KDF lowered to n={BENCH_SCRYPT_N} r={BENCH_SCRYPT_R} ({n:,})",
                f"{_num(idle['router_logins_per_s'])}/s, "
                f"{idle['router_cpu_ms_per_login']:.2f} ms CPU",
                "(not a target)",
                "",
            )
        )
        router = idle.get("router_default_cost")
        if router:
            out.append(
                Row(
                    f"1. router password check, default n={DEFAULT_SCRYPT_N} r={DEFAULT_SCRYPT_R}",
                    f"{router['logins_per_s']:.1f} logins/s, "
                    f"{router['cpu_ms_per_login']:.1f} ms CPU",
                    "(memory-hard on purpose)",
                    "",
                )
            )
    one = results.get("one_to_one", {})
    if "error" in one:
        out.append(Row("2./3. 1:1", "FAILED", "", one["error"]))
    for row in one.get("throughput", []):
        cpu = row["daemon_cpu_us_per_message"]
        rate = row["delivered_per_s"]
        ok = None
        if cpu is not None and row["saturated"] == "daemon":
            ok = cpu <= 60 and rate >= 16000
        out.append(
            Row(
                f"2. 1:1 {row['suite']}, {one['pairs']} pairs, window {row['window']}",
                f"{_num(rate)} msg/s, {_num(cpu, 1)} us/msg "
                f"(saturated: {row['saturated'].split(' ')[0]})",
                ">= 16,000 msg/s, <= 60 us",
                _verdict(ok),
            )
        )
    for row in one.get("latency", []):
        offered = row["offered_per_s"]
        cpu = row["daemon_cpu_us_per_message"]
        p99 = row["p99_ms"]
        target = ""
        ok = None
        if offered == 2000:
            target = "p99 < 2 ms, <= 100 us"
            ok = p99 is not None and cpu is not None and p99 < 2.0 and cpu <= 100
        out.append(
            Row(
                f"3. latency at {offered:,} msg/s offered",
                f"p50 {_num(row['p50_ms'], 2)} / p99 {_num(p99, 2)} / "
                f"p99.9 {_num(row['p999_ms'], 2)} ms; {_num(row['delivered_per_s'])} msg/s, "
                f"{_num(cpu, 1)} us/msg",
                target,
                _verdict(ok),
            )
        )
    out.extend(_steady_rows(results))
    loads = one.get("throughput", []) + one.get("latency", [])
    if loads:
        bad = [
            row
            for row in loads
            if not row["totals"]["consistent"] or not row["totals"].get("received_matches", True)
        ]
        out.append(
            Row(
                "counts: sent = delivered + failed, delivered = received",
                f"exact in all {len(loads)} loads" if not bad else f"WRONG in {len(bad)} loads",
                "exact",
                _verdict(not bad),
            )
        )
    out.extend(_group_rows(results.get("group")))
    out.extend(_offline_rows(results.get("offline")))
    out.extend(_external_rows(results))
    out.extend(_catch_up_rows(results.get("catch_up")))
    churn = results.get("churn", {})
    if "error" in churn:
        out.append(Row("7. churn", "FAILED", "", churn["error"]))
    elif churn:
        first, last = churn["first_tenth"], churn["last_tenth"]
        cpu_ratio = (last["daemon_cpu_us_per_message"] or 0) / (
            first["daemon_cpu_us_per_message"] or 1
        )
        rss_ratio = last["rss_kib"] / first["rss_kib"]
        out.append(
            Row(
                f"7. churn RSS, first/last tenth of {churn['cycles']:,} cycles",
                f"{first['rss_kib'] / 1024:.1f} / {last['rss_kib'] / 1024:.1f} MiB",
                f"flat (<= x{FLAT_RSS_RATIO})",
                _verdict(rss_ratio <= FLAT_RSS_RATIO),
            )
        )
        out.append(
            Row(
                "7. churn CPU per message (cycle included), first/last",
                f"{_num(first['daemon_cpu_us_per_message'])} / "
                f"{_num(last['daemon_cpu_us_per_message'])} us",
                f"flat (<= x{FLAT_CPU_RATIO})",
                _verdict(cpu_ratio <= FLAT_CPU_RATIO),
            )
        )
    out.extend(Row(*figure) for figure in gateway.figures(results.get("gateway")))
    out.extend(Row(*figure) for figure in push_outage.figures(results.get("push_outage")))
    out.extend(Row(*figure) for figure in distributed.figures(results.get("distributed")))
    return out


def table(results: dict[str, Any]) -> str:
    """A fixed-width table for the terminal."""
    lines = rows(results)
    headers = Row("figure", "measured", "target", "verdict")
    widths = [
        max(len(getattr(row, name)) for row in [headers, *lines])
        for name in ("figure", "measured", "target", "verdict")
    ]

    def render(row: Row) -> str:
        cells = (row.figure, row.measured, row.target, row.verdict)
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(headers), rule, *(render(row) for row in lines)])


def _existing_analysis(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError:
        return ""
    start = text.find(ANALYSIS_BEGIN)
    end = text.find(ANALYSIS_END)
    if start < 0 or end < start:
        return ""
    return text[start + len(ANALYSIS_BEGIN) : end].strip()


def markdown(results: dict[str, Any], analysis: str) -> str:
    meta = results["meta"]
    plan = results["plan"]
    versions = ", ".join(f"{name} {version}" for name, version in meta["versions"].items())
    parts: list[str] = []
    add = parts.append
    add("# Benchmarks\n")
    add(
        "Generated by `python -m bench.run --" + plan["name"] + "` (`make bench-full`); "
        "do not edit by hand except the analysis section, which the tool keeps. "
        "The raw results are in `bench/results/` (not committed).\n"
    )
    add("## The run\n")
    add(
        _md_table(
            ["what", "value"],
            [
                ["date (UTC)", results["started"]],
                ["machine", f"{meta['cpu']}, {meta['cores']} cores, {meta['memory']}"],
                ["kernel", meta["kernel"]],
                ["Python", meta["python"]],
                ["libraries", versions],
                ["cim commit", meta["commit"]],
                ["plan", plan["name"]],
                ["run time", f"{results['seconds']:.0f} s"],
            ],
        )
    )
    add("")
    add("### How it is measured\n")
    add(
        "- A real daemon (`twistd -n cim --config bench.ini`, embedded backends: SQLite, "
        "memory state, local registry) runs pinned to core 0 with `taskset -c 0`; "
        f"{plan['workers']} or more load-generator processes (`bench/loadgen.py`) run "
        "pinned to core 1. The generator speaks the real protocol: router login over "
        "HTTP, the RSA-OAEP handshake with the token, sealed frames, the six packets, "
        "heartbeats.\n"
        "- Every CPU figure is the daemon's own accounting: utime + stime of all its "
        "threads from `/proc/<pid>/stat`, divided by what the generator counted in the "
        "same interval. RSS is `VmRSS` from `/proc/<pid>/status`. The generator's own CPU "
        "is read the same way and shown beside the daemon's, so a reader can tell which "
        "side saturated: the side whose core was busy >= 85 % of the time (from "
        "`/proc/stat`; the bracketed core figure counts every process on that core, so "
        "a gap between the two is another program using the core).\n"
        f"- The benchmark config lowers the password KDF to scrypt n={BENCH_SCRYPT_N}, "
        f"r={BENCH_SCRYPT_R} (the lowest the config accepts) so thousands of users can log "
        "in through the router once each; the router's real cost (n="
        f"{DEFAULT_SCRYPT_N}, r={DEFAULT_SCRYPT_R}, the shipped default) is measured on "
        "its own. It also raises `[im] max_connections_per_address` (every client is "
        "127.0.0.1), lifts the per-address failed-login throttle, and sets "
        f"`[im] heartbeat_interval = {plan['heartbeat_interval']:g}` so the idle "
        "connections exchange heartbeats while they are measured.\n"
        "- Users are inserted straight into the daemon's SQLite file before it starts, "
        "all with one precomputed hash (the hash carries its cost, so every login still "
        "runs the KDF in full).\n"
        "- Latency is end to end on one machine clock (`CLOCK_MONOTONIC`): the sender "
        "stamps the msg:R text when it seals it, the receiver reads the stamp when the "
        "msg:N is opened. It includes both clients' event loops.\n"
        "- Counts are exact: every msg:R ends delivered, accepted (a group message), "
        "stored (for an offline receiver) or failed, checked for every load; any failure "
        "is listed. Group loads also check that every accepted message reached every "
        "other member once and that every msg:N was acknowledged; the offline pull, that "
        "it brought every stored message once and left the store empty; the catch-up, "
        "that the summary was one frame and the client library handed every stored "
        "message over once, the newest page of the newest conversation first.\n"
        "- Figures 4, 5 and 8 run on the embedded daemon in both plans; figure 6 runs the "
        "1:1, group and offline scenarios again on PostgreSQL + Redis + RabbitMQ "
        "(`--full`, or `--only backends`).\n"
        "- Figure 3b (bench.steady) holds 2,000 msg/s for 15 s (30 s in `--full`) on the "
        "shipped configuration (heartbeat 30 s) and reads the daemon's reactor lag probe "
        "(`[node] lag_probe_interval = 5ms`, `cim_reactor_gap_*` on /metrics) before and "
        "after: the longest gap between two of its runs is the longest stall.\n"
        "- The three-node run on the distributed backends and its projection to a million "
        "users are in docs/scaling.md (`python -m bench.scaling`).\n"
    )
    add("### How to reproduce\n")
    add(
        "```sh\nmake bench        # quick: about two minutes, prints the table\n"
        "make bench-full   # everything; rewrites this file\n"
        "# some scenarios only (idle, one_to_one, steady, group, offline, catch_up, churn, "
        "backends, gateway, push_outage, distributed):\n"
        ".venv/bin/python -m bench.run --full --only group,offline,backends --no-docs\n"
        "# a daemon from another checkout (a hot-path change), same generator:\n"
        ".venv/bin/python -m bench.run --quick --source /path/to/other/checkout\n```\n"
    )
    add("## Figures against the targets (issues 6 and 20)\n")
    add(
        _md_table(
            ["figure", "measured", "target", "verdict"],
            [[r.figure, r.measured, r.target, r.verdict] for r in rows(results)],
        )
    )
    add("")
    add(_details(results))
    profile = results.get("one_to_one", {}).get("profile")
    if profile:
        add(_profile_section(profile, results))
    add("## Analysis\n")
    add(ANALYSIS_BEGIN)
    add(analysis or "(not written yet)")
    add(ANALYSIS_END)
    add("")
    notes = results.get("notes") or []
    if notes:
        add("## Notes on this run\n")
        add("\n".join(f"- {note}" for note in notes) + "\n")
    return "\n".join(parts)


def _details(results: dict[str, Any]) -> str:
    out: list[str] = []
    idle_rows = [r for r in results.get("idle", []) if "error" not in r]
    if idle_rows:
        out.append("### 1. Idle connections and logins\n")
        out.append(
            _md_table(
                [
                    "connections",
                    "RSS empty / logged in / connected",
                    "KiB per conn (all / socket only)",
                    "handshakes/s",
                    "daemon ms per handshake",
                    "daemon (core 0) / generator (core 1) CPU while connecting",
                    "router logins/s (lowered KDF), ms CPU",
                    "idle daemon CPU with heartbeats",
                    "heartbeats sent / answered",
                ],
                [
                    [
                        f"{r['connections']:,}",
                        f"{r['rss_empty_kib'] / 1024:.1f} / {r['rss_logged_in_kib'] / 1024:.1f}"
                        f" / {r['rss_connected_kib'] / 1024:.1f} MiB",
                        f"{r['rss_per_connection_kib']:.2f} / "
                        f"{r['rss_per_connection_socket_only_kib']:.2f}",
                        _num(r["handshakes_per_s"]),
                        f"{r['handshake_cpu_ms']:.2f}",
                        f"{_share(r['handshake_daemon_share'])} "
                        f"({_share(r.get('handshake_daemon_core_busy'))}) / "
                        f"{_share(r['handshake_generator_share'])} "
                        f"({_share(r.get('handshake_generator_core_busy'))})",
                        f"{_num(r['router_logins_per_s'])}, {r['router_cpu_ms_per_login']:.2f}",
                        _share(r["idle_daemon_cpu_share"]),
                        f"{r['heartbeats_sent']:,} / {r['heartbeats_answered']:,}",
                    ]
                    for r in idle_rows
                ],
            )
        )
        resumed = [r for r in idle_rows if "resume_cpu_ms" in r]
        if resumed:
            out.append(
                "\nThe same connections closed and back with the resumption ticket of their"
                " login (`[im] resume_window`: no router, no RSA): "
                + "; ".join(
                    f"{r['connections']:,}: {_num(r['resumptions_per_s'])} resumptions/s, "
                    f"{r['resume_cpu_ms']:.2f} ms of daemon CPU each"
                    for r in resumed
                )
                + ".\n"
            )
        router = idle_rows[0].get("router_default_cost")
        if router:
            out.append(
                f"\nRouter password check at the default cost (scrypt n={DEFAULT_SCRYPT_N}, "
                f"r={DEFAULT_SCRYPT_R}, 16 MiB per check, on the two-thread KDF pool pinned "
                f"with the daemon to one core): {router['logins']} logins, "
                f"{router['logins_per_s']:.1f} logins/s, {router['cpu_ms_per_login']:.1f} ms "
                "of daemon CPU per login.\n"
            )
    one = results.get("one_to_one", {})
    if one.get("throughput"):
        out.append("### 2. 1:1 throughput at saturation (full 6-packet flow)\n")
        out.append(
            _md_table(
                [
                    "suite",
                    "pairs",
                    "window",
                    "delivered msg/s",
                    "daemon us/msg",
                    "daemon CPU (core 0 busy)",
                    "generator CPU (core 1 busy)",
                    "saturated",
                    "sent = delivered + failed",
                ],
                [
                    [
                        r["suite"],
                        str(one["pairs"]),
                        str(r["window"]),
                        _num(r["delivered_per_s"]),
                        _num(r["daemon_cpu_us_per_message"], 1),
                        _busy(r, "daemon"),
                        _busy(r, "generator"),
                        r["saturated"],
                        _totals(r["totals"]),
                    ]
                    for r in one["throughput"]
                ],
            )
        )
        out.append("")
    if one.get("latency"):
        out.append("### 3. Latency at fixed offered rates (chacha20-poly1305)\n")
        out.append(
            _md_table(
                [
                    "offered msg/s",
                    "achieved msg/s",
                    "p50 ms",
                    "p99 ms",
                    "p99.9 ms",
                    "max ms",
                    "samples",
                    "daemon us/msg",
                    "daemon (core 0) / generator (core 1) CPU",
                    "sent = delivered + failed",
                ],
                [
                    [
                        f"{r['offered_per_s']:,}",
                        _num(r["delivered_per_s"]),
                        _num(r["p50_ms"], 2),
                        _num(r["p99_ms"], 2),
                        _num(r["p999_ms"], 2),
                        _num(r["max_ms"], 2),
                        f"{r['samples']:,}",
                        _num(r["daemon_cpu_us_per_message"], 1),
                        f"{_busy(r, 'daemon')} / {_busy(r, 'generator')}",
                        _totals(r["totals"]),
                    ]
                    for r in one["latency"]
                ],
            )
        )
        out.append("")
    out.extend(_group_details(results.get("group")))
    out.extend(_offline_details(results.get("offline")))
    out.extend(_external_details(results))
    out.extend(_catch_up_details(results.get("catch_up")))
    churn = results.get("churn", {})
    if churn and "error" not in churn:
        out.append("### 7. Churn\n")
        out.append(
            f"{churn['cycles']:,} cycles, each: router login (lowered KDF), connect, "
            f"handshake, {churn['messages_per_cycle']} messages to an always-connected "
            f"receiver with the full six packets, disconnect; {churn['concurrency']} "
            "concurrent clients. The daemon is sampled after each tenth. CPU per message "
            "includes the whole cycle (login and handshake too). RSS before the first "
            f"cycle: {churn['rss_before_kib'] / 1024:.1f} MiB; after the last, with every "
            f"churning client gone: {churn['rss_after_kib'] / 1024:.1f} MiB.\n"
        )
        out.append(
            _md_table(
                [
                    "tenth",
                    "cycles/s",
                    "daemon us/msg",
                    "daemon ms/cycle",
                    "RSS MiB",
                    "daemon / generator CPU",
                ],
                [
                    [
                        str(s["segment"]),
                        _num(s["cycles_per_s"]),
                        _num(s["daemon_cpu_us_per_message"]),
                        _num(s["daemon_cpu_ms_per_cycle"], 2),
                        f"{s['rss_kib'] / 1024:.1f}",
                        f"{_share(s['daemon_cpu_share'])} / {_share(s['generator_cpu_share'])}",
                    ]
                    for s in churn["segments"]
                ],
            )
        )
        out.append(
            f"\nsent = delivered + failed (warm-up cycles included): {_totals(churn['totals'])}\n"
        )
    return "\n".join(out)


def _profile_section(profile: dict[str, Any], results: dict[str, Any]) -> str:
    if "error" in profile:
        return f"## Profile\n\npy-spy failed: {profile['error']}\n"
    plan = results["plan"]
    window = plan["profile_window"]
    if window not in plan["windows"]:
        window = plan["windows"][-1]
    out = [
        "## Profile of the 1:1 path\n",
        f"{profile['tool']}, `py-spy record --rate 250` on the daemon for "
        f"{results['plan']['profile_seconds']:.0f} s during the chacha20-poly1305 "
        f"saturation run (window {window}), right after its measured interval (so the "
        f"sampling does not disturb the figures above). {profile['samples']:,} samples "
        "of the reactor thread (the idle database and KDF pool threads left out); "
        "shares are of those samples.\n",
        "Own time (the function itself, not its callees):\n",
        _md_table(
            ["function", "own %"],
            [[f"`{name}`", f"{share:.1f}"] for name, share in profile["own"][:20]],
        ),
        "\nInclusive time (the function and everything it calls):\n",
        _md_table(
            ["function", "inclusive %"],
            [[f"`{name}`", f"{share:.1f}"] for name, share in profile["inclusive"][:25]],
        ),
        "",
    ]
    return "\n".join(out)


def write_markdown(results: dict[str, Any], path: str) -> None:
    analysis = _existing_analysis(path)
    text = markdown(results, analysis)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)

"""Figure 8, the catch-up (``bench.catch_up``): its rows in the figures table and its
section of ``docs/benchmarks.md``.

The section takes one run or several: ``python -m bench.catch_up_report A.json
B.json C.json`` prints it for the catch-up of each saved run with the median of each
figure (the machine is shared, so one run is not enough to quote).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

from bench.report import Row, _busy, _md_table, _num, _verdict

__all__ = ["details", "rows"]

TITLE = "### 8. Catch-up after a long absence (client library, issue 14)"


def _failed(value: Any) -> bool:
    return isinstance(value, dict) and "error" in value


def rows(result: dict[str, Any] | None) -> list[Row]:
    name = "8. catch-up by the client library"
    if result is None:
        return [Row(name, "not run", "", "")]
    if _failed(result):
        return [Row(name, "FAILED", "", result["error"])]
    pull = result["catch_up"]
    return [
        Row(
            f"8. catch-up: {result['messages']:,} messages in {result['conversations']} "
            "conversations, one login (client library)",
            f"summary {pull['summary_seconds'] * 1000:.0f} ms, first page "
            f"{pull['first_page_seconds'] * 1000:.0f} ms, all {pull['done_seconds']:.2f} s; "
            f"{_num(pull['daemon_cpu_us_per_message'], 1)} us CPU/msg",
            "(no target)",
            "",
        ),
        Row(
            "8. catch-up counts: one summary frame, newest page of the newest conversation "
            "first, pulled = stored once each, nothing left",
            _counts(pull),
            "exact",
            _verdict(bool(pull["consistent"])),
        ),
    ]


def _counts(pull: dict[str, Any]) -> str:
    return (
        f"{pull['received'].get('OFFLINE_SUMMARY_A', 0)} frame of "
        f"{len(pull['summary_conversations'])} entries; {len(pull['first_page'])} of the "
        f"newest first after {pull['pulls_sent_at_first_message']} OFFLINE_R; "
        f"{pull['pulled']:,} = {pull['stored']:,}, {pull['unique']:,} unique; "
        f"{pull['left_in_database']} left"
    )


def _median(runs: Sequence[dict[str, Any]], value: Callable[[dict[str, Any]], float]) -> float:
    return statistics.median(value(run) for run in runs)


def details(results: Sequence[dict[str, Any]], labels: Sequence[str] = ()) -> list[str]:
    """The section for one run's catch-up result, or several runs' with medians."""
    runs = [r for r in results if r and not _failed(r)]
    if not runs:
        return []
    first = runs[0]
    out = [f"{TITLE}\n"]
    out.append(
        f"{first['conversations']} connected clients, one per conversation, send "
        f"{first['messages']:,} msg:R to a user who is not connected (an equal share each, "
        f"window {first['window']}), until every one is answered ack:N STORED and the "
        "daemon's database holds them all. With the daemon idle again, the user's device "
        "logs in with the client library (`ChatClient`, default hand-over: the newest "
        "page of the newest conversation first) in a process pinned to core 1 "
        "(`bench/catch_up_client.py`), which notes every frame and every message handed "
        "to the application, with the time since the client started (router login, "
        "handshake and all). *online*: the handshake done; *summary*: OFFLINE_SUMMARY_A "
        "received; *first page*: the last message of the first OFFLINE_A page handed "
        "to the application; *all*: "
        "OFFLINE_ACK_A received (every page pulled and handed over, the cursors moved). "
        "The daemon's CPU from the login to OFFLINE_ACK_A is divided by the messages "
        "handed over.\n"
    )
    body = []
    figures: list[tuple[str, Callable[[dict[str, Any]], float], int]] = [
        ("stored msg/s", lambda r: r["fill"]["stored_per_s"], 0),
        ("daemon us per stored msg", lambda r: r["fill"]["daemon_cpu_us_per_unit"], 1),
        ("login to online ms", lambda r: r["catch_up"]["online_seconds"] * 1000, 1),
        ("login to summary ms", lambda r: r["catch_up"]["summary_seconds"] * 1000, 1),
        ("login to first page ms", lambda r: r["catch_up"]["first_page_seconds"] * 1000, 1),
        ("login to all pulled s", lambda r: r["catch_up"]["done_seconds"], 3),
        (
            "daemon us per caught-up msg",
            lambda r: r["catch_up"]["daemon_cpu_us_per_message"],
            1,
        ),
        ("client us per msg", lambda r: r["catch_up"]["generator_cpu_us_per_unit"], 1),
    ]
    headers = ["run", *(name for name, _, _ in figures)]
    headers += ["daemon (core 0) / client (core 1) CPU during the catch-up", "counts"]
    for index, run in enumerate(runs):
        label = labels[index] if index < len(labels) else str(index + 1)
        pull = run["catch_up"]
        cells = [_num(value(run), digits) for _, value, digits in figures]
        verdict = "exact" if pull["consistent"] else "WRONG"
        body.append(
            [label, *cells, f"{_busy(pull, 'daemon')} / {_busy(pull, 'generator')}", verdict]
        )
    if len(runs) > 1:
        medians = [_num(_median(runs, value), digits) for _, value, digits in figures]
        body.append([f"**median of {len(runs)}**", *medians, "", ""])
    out.append(_md_table(headers, body))
    pull = first["catch_up"]
    received, sent = pull["received"], pull["sent"]
    out.append(
        f"\nThe summary: {received.get('OFFLINE_SUMMARY_A', 0)} frame "
        f"({pull['summary_bytes']:,} bytes of protobuf) with "
        f"{len(pull['summary_conversations'])} entries of {pull['summary_counts'][0]:,} "
        f"messages each (total {pull['summary_total']:,}, `more` "
        f"{str(pull['summary_more']).lower()}). The first page: {len(pull['first_page'])} "
        f"messages of the newest conversation, handed over after "
        f"{pull['pulls_sent_at_first_message']} OFFLINE_R and "
        f"{pull['pages_received_at_first_message']} OFFLINE_A, before the next page was "
        f"asked for. Frames sent by the device: {_frames(sent)}; received: "
        f"{_frames(received)} ({pull['page_bytes'] / 1024:,.0f} KiB of pages). Counts: "
        f"{pull['pulled']:,} handed over of {pull['stored']:,} stored, "
        f"{pull['unique']:,} distinct ids, {pull['conversations_pulled']} conversations, "
        f"{pull['left_in_database']} left past the device's cursors afterwards"
        + ("" if all(r["catch_up"]["consistent"] for r in runs) else " (INCONSISTENT)")
        + ".\n"
    )
    return out


def _frames(counts: dict[str, int]) -> str:
    return ", ".join(f"{n:,} {name}" for name, n in counts.items())


def main(argv: list[str]) -> int:
    """Print the section for the catch-up of each saved run given, with medians."""
    runs, labels = [], []
    for path in argv:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
        if "catch_up" in saved:
            runs.append(saved["catch_up"])
            labels.append(saved["started"])
            meta = saved["meta"]
            print(
                f"{saved['started']}: {meta['cpu']}, {meta['cores']} cores, "
                f"{meta['memory']}, Python {meta['python']}, commit {meta['commit']}"
            )
    print("\n".join(details(runs, labels)))
    return 0 if runs else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

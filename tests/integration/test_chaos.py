"""The chaos run, shortened for CI (tests/integration/support/chaos/run.py ``CI``).

Three real nodes on private Redis, ZooKeeper, RabbitMQ and PostgreSQL; 20 1:1 pairs and
a ten-member group write through the client library while each fault comes and goes, and
30 % of every client's gap fills are refused throughout (``CI.refused_fills``: the
refusal a node whose database is down gives, which once lost messages). For every fault:
nothing a sender was told went well is missing from its receivers' applications after
the final catch-up, nothing is shown twice, nothing is shown out of the server's order,
every send ended, and no message failed: every outage here is shorter than the library's
retry budget, so refusing a message for good is never the right answer (see
``FAILED_BOUNDS``).
"""

from __future__ import annotations

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from tests.integration.support.chaos.app import RETRY
from tests.integration.support.chaos.run import CI, FAULTS, Report, run

_SHORTER = f"the outage is shorter than the library's retry budget ({sum(RETRY.waits):g} s)"
FAILED_BOUNDS: dict[str, tuple[int, str]] = {fault: (0, _SHORTER) for fault in FAULTS}
"""Failed outcomes allowed per fault, and why. A node that cannot take a message
refuses it (UNAVAILABLE) and the library sends it again; it only ends failed when the
fault outlasts every resend, which none of these does."""


class ChaosTests(TestCase):
    timeout = 900

    def test_every_fault_loses_duplicates_and_reorders_nothing(self) -> None:
        return ensureDeferred(self._chaos())

    async def _chaos(self) -> None:
        report: Report = await run(self, CI)
        print(f"\n{report.table()}\nran {report.seconds:.0f} s")
        self.assertEqual(len(report.placement), 3, f"clients on every node: {report.placement}")
        problems = []
        for row in report.rows:
            where = f"{row.phase} ({row.kind})"
            self.assertGreater(row.sent, 0, f"{where}: traffic during the fault")
            bound, why = FAILED_BOUNDS[row.phase]
            for figure, value in (
                ("unanswered", row.unanswered),
                ("lost", row.lost),
                ("duplicates", row.duplicates),
                ("order violations", row.order_violations),
                ("shown though failed", row.shown_though_failed),
            ):
                if value:
                    problems.append(f"{where}: {value} {figure}")
            if row.failed > bound:
                problems.append(f"{where}: {row.failed} failed, more than {bound}: {why}")
        if report.unanswered_catch_ups:
            problems.append(f"{report.unanswered_catch_ups} clients' final catch-up unanswered")
        if problems:
            self.fail("\n".join(problems) + f"\n{report.table()}")

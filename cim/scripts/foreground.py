"""Run a command as the terminal's foreground job, for ``make run``.

Two things make ``make run`` end badly when the daemon stops as asked. A Ctrl-C
reaches make itself (the terminal signals the whole foreground process group), and
make then prints ``*** [run] Interrupt`` and dies of the signal, however cleanly its
child stopped. And twistd re-raises the SIGTERM it stopped for, as init systems
expect, which make reports as ``*** [run] Terminated``.

So the command runs in its own process group, which is given the terminal: Ctrl-C
reaches the daemon only. SIGTERM, SIGINT or SIGHUP sent to this process (make passes
its own SIGTERM on to it) go to the daemon too, and the daemon starts with them at
their defaults even when make was started with them ignored (a script's background
job). A daemon that ended because of one of those signals ended as asked: exit
status 0. Any other status is passed on.

    python -m cim.scripts.foreground COMMAND [ARGUMENT ...]
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _terminal() -> int | None:
    """stdin's descriptor when it is this process's controlling terminal."""
    try:
        if os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp():
            return 0
    except OSError:
        pass
    return None


def run(command: Sequence[str]) -> int:
    terminal = _terminal()
    started: list[subprocess.Popen[bytes]] = []
    early: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        if not started:
            early.append(signum)  # passed on once the child exists
            return
        with contextlib.suppress(ProcessLookupError):  # it has just ended
            os.killpg(started[0].pid, signum)

    # Caught before the child starts, not after: a caught signal is reset to its
    # default in the child, an ignored one stays ignored. A shell runs a background
    # job (`make test &` in a script) with SIGINT ignored, and a Python started with
    # SIGINT ignored never installs a handler for it, so twistd would sit through a
    # Ctrl-C. The daemon must start with the stop signals at their defaults.
    for signum in STOP_SIGNALS:
        signal.signal(signum, forward)
    child = subprocess.Popen(command, process_group=0)
    started.append(child)
    for received in early:
        forward(received, None)
    if terminal is not None:
        # Handing the terminal over (and back) from outside its foreground group.
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        os.tcsetpgrp(terminal, child.pid)
    try:
        status = child.wait()
    finally:
        if terminal is not None:
            os.tcsetpgrp(terminal, os.getpgrp())
    if status < 0 and -status in STOP_SIGNALS:
        return 0  # stopped as asked
    if status in (128 + signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGHUP):
        return 0  # the same, reported by a shell in between
    return status if status >= 0 else 128 - status


def main(argv: Sequence[str] | None = None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    if not command:
        sys.stderr.write("usage: python -m cim.scripts.foreground COMMAND [ARGUMENT ...]\n")
        return 2
    return run(command)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Makes sure the command-line tools some tests drive are installed: systemd-analyze
# (tests/integration/test_systemd.py verifies etc/systemd/cim.service) and tmux (tests/{unit,integration}/test_console.py
# drives two chat consoles in it) and Debian's chromium (the web app's browser tests
# drive it headless through playwright-core; no test downloads a browser of its own).
# Silent when nothing is missing; `.ci/run` calls it before the tests.
set -euo pipefail

missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v tmux >/dev/null || missing+=(tmux)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ "${#missing[@]}" -eq 0 ] && exit 0

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
echo "tools.sh: installing ${missing[*]}"
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null

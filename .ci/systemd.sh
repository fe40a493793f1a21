#!/usr/bin/env bash
# Makes sure `systemd-analyze` is installed, so tests/test_systemd.py can verify
# etc/systemd/cim.service. Silent when nothing is missing; `.ci/run` calls it before
# the tests.
set -euo pipefail

command -v systemd-analyze >/dev/null && exit 0

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
echo "systemd.sh: installing systemd"
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  systemd >/dev/null

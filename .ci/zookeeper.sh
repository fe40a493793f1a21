#!/usr/bin/env bash
# Makes sure Debian's `zookeeper` package (and a Java runtime) is installed, so the
# integration tests can start their private ZooKeeper servers (tests/integration/support/zookeeper.py).
# Silent when nothing is missing; `.ci/run` calls it before the tests.
set -euo pipefail

missing=()
[ -e /usr/share/java/zookeeper.jar ] || missing+=(zookeeper)
command -v java >/dev/null || missing+=(default-jre-headless)
[ "${#missing[@]}" -eq 0 ] && exit 0

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
echo "zookeeper.sh: installing ${missing[*]}"
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null

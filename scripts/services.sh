#!/usr/bin/env bash
# Installs (only what is missing) and starts the four services cim can use instead of
# its embedded backends, all on loopback, for a developer's Debian/Ubuntu machine:
#
#   Redis       127.0.0.1:6379   [state] backend = redis
#   RabbitMQ    127.0.0.1:5672   [queue] (guest/guest, loopback only)
#   PostgreSQL  127.0.0.1:5432   [database]; the tests use postgres@127.0.0.1:5432/test
#   ZooKeeper   127.0.0.1:2181   [registry] backend = zookeeper
#
# Run it again at any time: what is installed is not reinstalled, what is running is
# left alone. Needs root or sudo. The README calls it as `make services`.
#
# Environment:
#   ZOOKEEPER_PORT=2181                  client port of the ZooKeeper started here
#   ZOOKEEPER_DIR=/var/lib/zookeeper/cim its config, data and pid file
#   CIM_SERVICES_TRUST_LOOPBACK=1        let the postgres role in from 127.0.0.1 without
#                                        a password (what the test suite's default URL
#                                        needs); off unless asked, it changes pg_hba.conf
set -euo pipefail

ZOOKEEPER_PORT=${ZOOKEEPER_PORT:-2181}
ZOOKEEPER_DIR=${ZOOKEEPER_DIR:-/var/lib/zookeeper/cim}
ZOOKEEPER_LOG=${ZOOKEEPER_LOG:-/var/log/zookeeper/cim-zookeeper.log}
WAIT_SECONDS=60

say() { printf '%s\n' "services: $*"; }
die() { printf '%s\n' "services: $*" >&2; exit 1; }

if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null; then
  SUDO=(sudo)
else
  die "run as root or install sudo"
fi
as_root() { "${SUDO[@]}" "$@"; }

# A TCP port that accepts connections (bash's /dev/tcp: no netcat needed).
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # wait_for <what> <command...>: poll with a deadline, never forever
  local what=$1; shift
  local deadline=$((SECONDS + WAIT_SECONDS))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "$what did not come up within ${WAIT_SECONDS}s"
    sleep 0.5
  done
}

# Starts a packaged service through systemd where it runs, else its init script
# (containers and WSL have no systemd).
start_service() {
  if [ -d /run/systemd/system ]; then
    as_root systemctl start "$1"
  else
    as_root service "$1" start >/dev/null
  fi
}
restart_service() {
  if [ -d /run/systemd/system ]; then
    as_root systemctl restart "$1"
  else
    as_root service "$1" restart >/dev/null
  fi
}

# --- install what is missing (one apt-get update at most) ------------------------------

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v rabbitmq-server >/dev/null || [ -x /usr/sbin/rabbitmq-server ] || missing+=(rabbitmq-server)
command -v pg_ctlcluster >/dev/null || missing+=(postgresql)
command -v pg_isready >/dev/null || missing+=(postgresql-client)
[ -e /usr/share/java/zookeeper.jar ] || missing+=(zookeeper)
command -v java >/dev/null || missing+=(default-jre-headless)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- Redis ---------------------------------------------------------------------------
# Debian's redis.conf already binds 127.0.0.1 and ::1 only.

if [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; then
  say "Redis already running on 127.0.0.1:6379"
else
  start_service redis-server
  wait_for Redis sh -c '[ "$(redis-cli -h 127.0.0.1 -p 6379 ping)" = PONG ]'
  say "Redis started on 127.0.0.1:6379"
fi

# --- RabbitMQ ------------------------------------------------------------------------
# Out of the box RabbitMQ and epmd listen on every interface; pin both to loopback
# unless the administrator has already said where they listen.

rabbit_changed=0
add_line() { # add_line <file> <pattern already configured> <line>
  if ! as_root grep -qsE "$2" "$1"; then
    as_root mkdir -p "$(dirname "$1")"
    printf '%s\n' "$3" | as_root tee -a "$1" >/dev/null
    rabbit_changed=1
  fi
}
add_line /etc/rabbitmq/rabbitmq.conf '^listeners\.tcp' 'listeners.tcp.local = 127.0.0.1:5672'
add_line /etc/rabbitmq/rabbitmq-env.conf '^ERL_EPMD_ADDRESS=' 'ERL_EPMD_ADDRESS=127.0.0.1'
add_line /etc/rabbitmq/rabbitmq-env.conf 'inet_dist_use_interface' \
  'export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"'

if port_open 5672; then
  if [ "$rabbit_changed" = 1 ]; then
    restart_service rabbitmq-server
    wait_for RabbitMQ port_open 5672
    say "RabbitMQ restarted on 127.0.0.1:5672 (now loopback only)"
  else
    say "RabbitMQ already running on 127.0.0.1:5672"
  fi
else
  start_service rabbitmq-server
  wait_for RabbitMQ port_open 5672
  say "RabbitMQ started on 127.0.0.1:5672"
fi

# --- PostgreSQL ----------------------------------------------------------------------
# Debian's cluster listens on localhost only.

if pg_isready -q -h 127.0.0.1 -p 5432; then
  say "PostgreSQL already running on 127.0.0.1:5432"
else
  start_service postgresql
  wait_for PostgreSQL pg_isready -q -h 127.0.0.1 -p 5432
  say "PostgreSQL started on 127.0.0.1:5432"
fi

as_postgres() { as_root runuser -u postgres -- "$@"; }
if [ "$(as_postgres psql -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'")" != 1 ]; then
  as_postgres createdb test
  say "PostgreSQL database 'test' created (the tests make scratch databases from it)"
fi
if ! PGCONNECT_TIMEOUT=3 psql -w "postgresql://postgres@127.0.0.1:5432/test" -tAc 'SELECT 1' \
  >/dev/null 2>&1; then
  hba=$(as_postgres psql -tAc 'SHOW hba_file')
  if [ "${CIM_SERVICES_TRUST_LOOPBACK:-0}" = 1 ]; then
    # First matching line wins, so it goes on top.
    as_root sed -i '1i host all postgres 127.0.0.1/32 trust  # added by cim scripts/services.sh' "$hba"
    as_postgres psql -qtAc 'SELECT pg_reload_conf()' >/dev/null
    say "PostgreSQL: postgres may now connect from 127.0.0.1 without a password ($hba)"
  else
    say "PostgreSQL: postgres@127.0.0.1/test needs a password here; either run again with"
    say "  CIM_SERVICES_TRUST_LOOPBACK=1 (adds 'host all postgres 127.0.0.1/32 trust' to $hba)"
    say "  or set CIM_TEST_POSTGRESQL_URL=postgresql+psycopg2://USER:PASSWORD@127.0.0.1:5432/test"
  fi
fi

# --- ZooKeeper -----------------------------------------------------------------------
# Debian's `zookeeper` package has the server but no service, so it is started here
# with java directly, as the package's `zookeeper` user, from its own config.

zookeeper_answers() { # "srvr" is the one four-letter command left enabled
  local reply
  reply=$(exec 3<>"/dev/tcp/127.0.0.1/$ZOOKEEPER_PORT" && printf 'srvr' >&3 && timeout 3 cat <&3) ||
    return 1
  [[ $reply == *"Zookeeper version"* ]]
}

if zookeeper_answers 2>/dev/null; then
  say "ZooKeeper already running on 127.0.0.1:$ZOOKEEPER_PORT"
elif port_open "$ZOOKEEPER_PORT"; then
  die "127.0.0.1:$ZOOKEEPER_PORT is taken by something that is not ZooKeeper"
else
  owner=root
  getent passwd zookeeper >/dev/null && owner=zookeeper
  as_root mkdir -p "$ZOOKEEPER_DIR/data" "$(dirname "$ZOOKEEPER_LOG")"
  # tickTime 1 s: the server expires sessions on tick boundaries, so a crashed
  # node's entry goes at most a second after its session timeout (cim promises 2 s).
  as_root tee "$ZOOKEEPER_DIR/zoo.cfg" >/dev/null <<EOF
# Written by cim scripts/services.sh; rewritten on every start.
tickTime=1000
initLimit=10
syncLimit=5
dataDir=$ZOOKEEPER_DIR/data
clientPort=$ZOOKEEPER_PORT
clientPortAddress=127.0.0.1
maxSessionTimeout=60000
admin.enableServer=false
4lw.commands.whitelist=srvr
autopurge.snapRetainCount=3
autopurge.purgeInterval=24
EOF
  as_root chown -R "$owner:" "$ZOOKEEPER_DIR"
  as_root touch "$ZOOKEEPER_LOG"
  as_root chown "$owner:" "$ZOOKEEPER_LOG"
  classpath=/usr/share/java/zookeeper.jar # its manifest lists the dependencies
  [ -e /usr/share/java/slf4j-simple.jar ] && classpath+=:/usr/share/java/slf4j-simple.jar
  as_root runuser -u "$owner" -- sh -c '
    setsid "$0" -Xmx512m -Dzookeeper.admin.enableServer=false \
      -cp "$1" org.apache.zookeeper.server.quorum.QuorumPeerMain "$2/zoo.cfg" \
      </dev/null >>"$3" 2>&1 &
    echo $! >"$2/zookeeper.pid"' "$(command -v java)" "$classpath" "$ZOOKEEPER_DIR" "$ZOOKEEPER_LOG"
  wait_for "ZooKeeper (log: $ZOOKEEPER_LOG)" zookeeper_answers
  say "ZooKeeper started on 127.0.0.1:$ZOOKEEPER_PORT (pid $(cat "$ZOOKEEPER_DIR/zookeeper.pid"), stop: kill \$(cat $ZOOKEEPER_DIR/zookeeper.pid))"
fi

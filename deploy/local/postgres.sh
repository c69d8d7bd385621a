#!/usr/bin/env bash
# Local PostgreSQL from Debian's packages: a cluster of our own ("bubuh") on its own port, run by the
# `postgres` user (PostgreSQL refuses to run as root, and cannot reach a data directory inside the repo).
#   postgres.sh install | start | stop | status | url
set -euo pipefail
port=${BUBUH_LOCAL_PG_PORT:-15432}
# a checkout on another port gets a cluster of its own: `stop` must never stop another checkout's server
default_cluster=bubuh; [ "$port" = 15432 ] || default_cluster=bubuh-$port
cluster=${BUBUH_LOCAL_PG_CLUSTER:-$default_cluster}
db=bubuh
role=bubuh
password=${BUBUH_LOCAL_PG_PASSWORD:-bubuh-local}

die() { echo "postgres: $*" >&2; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }

version() { ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -1; }

install() {
  if [ -n "$(version)" ] && command -v pg_createcluster >/dev/null; then return 0; fi
  [ "$(id -u)" = 0 ] || die "PostgreSQL is not installed: run 'sudo apt-get install postgresql', or set BUBUH_DATABASE_URL"
  echo "postgres: installing Debian's postgresql (once) ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  # Debian's package creates and starts a "main" cluster on 5432; we leave it alone and make our own.
  apt-get install -y -qq postgresql >/dev/null || die "apt-get install postgresql failed"
}

exists() { pg_lsclusters -h 2>/dev/null | awk -v c=$cluster '$2==c' | grep -q .; }
online() { pg_lsclusters -h 2>/dev/null | awk -v c=$cluster '$2==c {print $4}' | grep -q online; }

# Durability is PostgreSQL's default and stays so: fsync=on, synchronous_commit=on, full_page_writes=on.
# The rest is ordinary tuning for a write-heavy OLTP load on a small box: with the default 1 GB of WAL
# the pipeline benchmark forced a checkpoint every few seconds, and after each one the first change to
# every page goes into the WAL as a whole 8 KiB image (random uuid keys touch many pages); lz4 shrinks
# those images. JIT only ever slowed the platform's short statements. A lock waited on for more than
# 50 ms is logged (log_lock_waits after deadlock_timeout): issue 12 asks two members per tier for none.
# commit_delay: a committing backend that sees at least commit_siblings (5) other transactions open waits
# up to 1 ms before it flushes the WAL, so one fsync carries more commits (group commit). Every commit
# still returns only after its WAL is on disk. In a surge the door's commits mostly waited for WAL
# flushes (pg_stat_activity: LWLock:WALWrite and IO:WALSync), and with the delay the same load took
# fewer of them (README, "The front door, open loop").
# autovacuum_naptime 5 s (1 min by default): the queue tables (every outbox, the fair queue's schedule) hold
# a few live rows and churn thousands a minute; autovacuum removes their dead rows only when it looks, and
# until then each claim walks the index past them (README, "Benchmarks").
write_conf() {
  cat >"$1" <<CONF
listen_addresses = '127.0.0.1'
max_connections = 300
shared_buffers = 256MB
max_wal_size = 4GB
checkpoint_timeout = 15min
wal_compression = lz4
commit_delay = 1000
jit = off
log_lock_waits = on
deadlock_timeout = 50ms
autovacuum_naptime = 5s
CONF
}

start() {
  install
  local v; v=$(version)
  if ! exists; then
    if port_open "$port"; then die "port 127.0.0.1:$port is taken by another process: set BUBUH_LOCAL_PG_PORT (or BUBUH_DATABASE_URL to use that server)"; fi
    pg_createcluster -q "$v" "$cluster" -p "$port" -- --auth-local=peer --auth-host=scram-sha-256 >/dev/null
  fi
  # the settings are (re)written before every start, so a cluster made by an older checkout gets them too
  if ! online; then write_conf "/etc/postgresql/$v/$cluster/conf.d/bubuh.conf"; fi
  if online; then echo "postgres: already running (cluster $v/$cluster) on 127.0.0.1:$port"
  else
    if port_open "$port"; then die "port 127.0.0.1:$port is taken by another process: set BUBUH_LOCAL_PG_PORT (or BUBUH_DATABASE_URL)"; fi
    pg_ctlcluster "$v" "$cluster" start || die "pg_ctlcluster $v $cluster start failed (log: /var/log/postgresql/postgresql-$v-$cluster.log)"
  fi
  for _ in $(seq 1 100); do port_open "$port" && break; sleep 0.1; done
  as_postgres psql -q -p "$port" -d postgres -v ON_ERROR_STOP=1 >/dev/null <<SQL
SELECT 'CREATE ROLE $role LOGIN CREATEDB PASSWORD ''$password'''
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$role') \gexec
SELECT 'CREATE DATABASE $db OWNER $role'
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$db') \gexec
SQL
  echo "postgres: running (cluster $v/$cluster) on 127.0.0.1:$port"
}

stop() {
  local v; v=$(version)
  if [ -n "$v" ] && exists && online; then pg_ctlcluster "$v" "$cluster" stop -m fast; echo "postgres: stopped"; else echo "postgres: not running"; fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) if online; then echo "postgres: running on 127.0.0.1:$port"; else echo "postgres: stopped"; exit 3; fi ;;
  url) echo "postgresql://$role:$password@127.0.0.1:$port/$db" ;;
  *) echo "usage: $0 install|start|stop|status|url" >&2; exit 2 ;;
esac

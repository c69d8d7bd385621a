#!/usr/bin/env bash
# Local single-node Apache Kafka (KRaft) from Maven Central jars.
#   kafka.sh fetch | start | stop | status | bootstrap | cluster-id | credentials
# Everything lives under $BUBUH_LOCAL_DIR/kafka (default .local/kafka). Bound to 127.0.0.1 only.
# Secured like production: SASL/SCRAM-SHA-512 and ACLs (StandardAuthorizer, deny when no ACL). The admin
# credential is generated into kafka/credentials/admin.json and put into the metadata log when the storage
# is formatted (StorageTool format --add-scram, KIP-900); a data directory formatted without it (an older
# checkout's open broker) is formatted anew. The other principals are made by `bubuh kafka setup`.
# BUBUH_LOCAL_KAFKA_HEAP (default 768m) and BUBUH_LOCAL_KAFKA_JVM_OPTS (extra JVM flags: the tests' own
# short-lived brokers, tests/stack.OwnKafka, start on the C1 compiler alone, ~40% less CPU to start).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
local_dir=${BUBUH_LOCAL_DIR:-$root/.local}
home=$local_dir/kafka
port=${BUBUH_LOCAL_KAFKA_PORT:-19092}
controller_port=${BUBUH_LOCAL_KAFKA_CONTROLLER_PORT:-19093}
pidfile=$home/kafka.pid
creds=$home/credentials

die() { echo "kafka: $*" >&2; exit 1; }

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

fetch() {
  if [ -f "$home/libs/.complete" ]; then return 0; fi
  command -v java >/dev/null || die "java not found: install Java 17 (Debian: apt-get install openjdk-17-jre-headless)"
  command -v mvn >/dev/null || die "mvn not found: install Maven (Debian: apt-get install maven)"
  echo "kafka: fetching jars from Maven Central (once) ..."
  mkdir -p "$home/libs"
  mvn -q -B -f "$here/kafka/pom.xml" dependency:copy-dependencies -DoutputDirectory="$home/libs" \
    -DincludeScope=runtime >"$home/fetch.log" 2>&1 || { tail -20 "$home/fetch.log" >&2; die "mvn could not fetch the Kafka jars (see $home/fetch.log)"; }
  touch "$home/libs/.complete"
}

java_run() {  # java_run MAIN ARGS... ; the Kafka classpath and our log4j2 config (exec: the pid is java's)
  # shellcheck disable=SC2086 # BUBUH_LOCAL_KAFKA_JVM_OPTS is split into words on purpose
  exec java -Xms256m -Xmx${BUBUH_LOCAL_KAFKA_HEAP:-768m} -XX:+UseG1GC -XX:MaxGCPauseMillis=20 ${BUBUH_LOCAL_KAFKA_JVM_OPTS:-} \
    -Djava.awt.headless=true -Dkafka.logs.dir="$home/logs" \
    -Dlog4j2.configurationFile="$here/kafka/log4j2.properties" \
    -cp "$home/libs/*" "$@"
}

secret() { head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32; }

field() {  # field FILE NAME: a string value of our flat credential JSON files
  sed -n "s/.*\"$2\": *\"\([^\"]*\)\".*/\1/p" "$1"
}

credentials() {  # the admin (SCRAM, super user) and the controller's PLAIN user; generated once, mode 600
  mkdir -p "$creds"; chmod 700 "$creds"
  local who
  for who in admin controller; do
    if [ ! -s "$creds/$who.json" ]; then
      (umask 077; printf '{"username": "bubuh-%s", "password": "%s", "mechanism": "%s"}\n' "$who" "$(secret)" \
        "$([ $who = admin ] && echo SCRAM-SHA-512 || echo PLAIN)" >"$creds/$who.json")
    fi
  done
}

configure() {
  mkdir -p "$home/data" "$home/logs"
  credentials
  local admin_user admin_password controller_user controller_password
  admin_user=$(field "$creds/admin.json" username); admin_password=$(field "$creds/admin.json" password)
  controller_user=$(field "$creds/controller.json" username)
  controller_password=$(field "$creds/controller.json" password)
  (umask 077; sed -e "s|@PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$controller_port|g" -e "s|@DATA_DIR@|$home/data|g" \
    -e "s|@ADMIN_USER@|$admin_user|g" -e "s|@ADMIN_PASSWORD@|$admin_password|g" \
    -e "s|@CONTROLLER_USER@|$controller_user|g" -e "s|@CONTROLLER_PASSWORD@|$controller_password|g" \
    "$here/kafka/server.properties.in" >"$home/server.properties")
  # the admin's SCRAM credential exists only if the storage was formatted with it (marker written below):
  # storage from before (no credential, or another admin password) is formatted anew, data and all
  if [ -f "$home/data/meta.properties" ] && ! cmp -s "$home/data/.admin-scram" "$creds/admin.json"; then
    echo "kafka: $home/data was formatted without the current admin SCRAM credential: formatting it anew"
    rm -rf "$home/data"; mkdir -p "$home/data"
    rm -f "$creds/platform.json"   # its principal lived in the old metadata; `bubuh kafka setup` makes it again
  fi
  if [ ! -f "$home/data/meta.properties" ]; then
    local id
    id=$( (java_run kafka.tools.StorageTool random-uuid) 2>/dev/null | tail -1)
    [ -n "$id" ] || die "StorageTool random-uuid printed nothing"
    (java_run kafka.tools.StorageTool format -t "$id" -c "$home/server.properties" \
      --add-scram "SCRAM-SHA-512=[name=$admin_user,password=$admin_password]" >"$home/logs/format.log" 2>&1) \
      || { cat "$home/logs/format.log" >&2; die "StorageTool format failed"; }
    echo "$id" >"$home/cluster-id"
    cp "$creds/admin.json" "$home/data/.admin-scram"; chmod 600 "$home/data/.admin-scram"
  fi
}

start() {
  if running && ! cmp -s "$home/data/.admin-scram" "$creds/admin.json"; then
    # an open broker from before (no admin SCRAM credential): stop it, configure formats it anew
    echo "kafka: the running broker was not formatted with the current admin SCRAM credential: restarting it"
    stop
  fi
  if running; then echo "kafka: already running (pid $(cat "$pidfile")) on 127.0.0.1:$port"; return 0; fi
  if port_open "$port"; then
    die "port 127.0.0.1:$port is taken by another process: stop it, or set BUBUH_LOCAL_KAFKA_PORT (or BUBUH_KAFKA_BOOTSTRAP to use that broker)"
  fi
  if port_open "$controller_port"; then
    die "port 127.0.0.1:$controller_port is taken: set BUBUH_LOCAL_KAFKA_CONTROLLER_PORT"
  fi
  fetch
  configure
  : >"$home/logs/stdout.log"
  (java_run kafka.Kafka "$home/server.properties") >"$home/logs/stdout.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  local deadline=$((SECONDS + ${BUBUH_LOCAL_KAFKA_START_TIMEOUT:-90}))
  until grep -q "Kafka Server started" "$home/logs/server.log" 2>/dev/null && port_open "$port"; do
    if ! running; then tail -30 "$home/logs/stdout.log" "$home/logs/server.log" >&2 2>/dev/null || true; rm -f "$pidfile"; die "broker exited during start (logs in $home/logs)"; fi
    [ $SECONDS -lt $deadline ] || die "broker did not become ready in time (logs in $home/logs)"
    sleep 0.3
  done
  echo "kafka: running (pid $(cat "$pidfile")) on 127.0.0.1:$port, cluster id $(cat "$home/cluster-id")"
}

stop() {
  if ! running; then rm -f "$pidfile"; echo "kafka: not running"; return 0; fi
  local pid; pid=$(cat "$pidfile")
  kill -TERM "$pid"
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
  rm -f "$pidfile"
  # a new start must see a fresh "started" line, not the old one
  [ -f "$home/logs/server.log" ] && mv "$home/logs/server.log" "$home/logs/server.log.prev"
  echo "kafka: stopped"
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  status) if running; then echo "kafka: running (pid $(cat "$pidfile")) on 127.0.0.1:$port"; else echo "kafka: stopped"; exit 3; fi ;;
  bootstrap) echo "127.0.0.1:$port" ;;
  cluster-id) cat "$home/cluster-id" ;;
  credentials) echo "$creds" ;;
  *) echo "usage: $0 fetch|start|stop|status|bootstrap|cluster-id|credentials" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# The local test PKI (services/stamping/signing/dev_pki.py): CRLs, OCSP and an RFC 3161 TSA served by
# certomancer's Animator on 127.0.0.1 only.
#   pki.sh start | stop | status | url | trust-anchor
# The keys and certificates are made once by `bubuh keys dev-pki` under $BUBUH_LOCAL_DIR/pki
# (default .local/pki); the certificates name http://127.0.0.1:$BUBUH_LOCAL_PKI_PORT (default 18080).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
local_dir=${BUBUH_LOCAL_DIR:-$root/.local}
home=$local_dir/pki
port=${BUBUH_LOCAL_PKI_PORT:-18080}
pidfile=$home/pki.pid
bubuh=$root/.venv/bin/bubuh

die() { echo "pki: $*" >&2; exit 1; }
running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() {
  [ -x "$bubuh" ] || die "no virtualenv: run 'make setup' first"
  if running; then
    "$bubuh" keys dev-pki --if-missing   # a PKI made anew (a certificate added) must not be served stale
    if [ "$home/certomancer.yml" -nt "$pidfile" ]; then echo "pki: made anew, restarting"; stop; else
      echo "pki: already running (pid $(cat "$pidfile")) on 127.0.0.1:$port"; return 0; fi
  fi
  if port_open "$port"; then die "port 127.0.0.1:$port is taken by another process: set BUBUH_LOCAL_PKI_PORT"; fi
  "$bubuh" keys dev-pki --if-missing
  mkdir -p "$home/logs"
  (exec "$bubuh" keys serve-pki >"$home/logs/animator.log" 2>&1 </dev/null) &   # exec: the pid is the server's
  echo $! >"$pidfile"
  for _ in $(seq 1 100); do
    if ! running; then tail -20 "$home/logs/animator.log" >&2; rm -f "$pidfile"; die "the PKI services exited during start"; fi
    port_open "$port" && break
    sleep 0.1
  done
  port_open "$port" || die "the PKI services did not listen on 127.0.0.1:$port (log: $home/logs/animator.log)"
  echo "pki: running (pid $(cat "$pidfile")) on 127.0.0.1:$port, trust anchor $home/trust-anchor.pem"
}

stop() {
  if ! running; then rm -f "$pidfile"; echo "pki: not running"; return 0; fi
  local pid; pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$pidfile"
  echo "pki: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if running; then echo "pki: running (pid $(cat "$pidfile")) on 127.0.0.1:$port"; else echo "pki: stopped"; exit 3; fi ;;
  url) echo "http://127.0.0.1:$port" ;;
  trust-anchor) echo "$home/trust-anchor.pem" ;;
  *) echo "usage: $0 start|stop|status|url|trust-anchor" >&2; exit 2 ;;
esac

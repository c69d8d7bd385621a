#!/usr/bin/env bash
# `make run`: the local stack, the platform in the foreground, and the walkthrough once it is ready.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
deploy/local/stack.sh up
mkdir -p .local/run
ready=.local/run/foreground.ready
rm -f "$ready"
.venv/bin/bubuh serve --ready-file "$ready" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; exit 0' INT TERM
for _ in $(seq 1 300); do
  [ -f "$ready" ] && break
  kill -0 $pid 2>/dev/null || { wait $pid; exit $?; }
  sleep 0.2
done
[ -f "$ready" ] || { echo "bubuh: not ready after 60 s" >&2; kill -TERM $pid; exit 1; }
.venv/bin/bubuh demo || true
echo
echo "Bubuh is running: API http://127.0.0.1:${BUBUH_HTTP_PORT:-8080} (OpenAPI at /openapi.json, metrics at /metrics)."
echo "Ctrl-C stops it; 'make down' also stops Kafka and PostgreSQL."
wait $pid

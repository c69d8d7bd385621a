#!/usr/bin/env bash
# The local infrastructure: Kafka + PostgreSQL + the test PKI (CRL, OCSP, TSA), the same for `make run`,
# `make test` and `.ci/run`.
#   stack.sh up | down | status | env
# BUBUH_KAFKA_BOOTSTRAP / BUBUH_DATABASE_URL / BUBUH_SIGNING_TSA_URL point at an existing broker / server /
# time-stamp authority: that part is not started.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

case "${1:-}" in
  up)
    if [ -z "${BUBUH_KAFKA_BOOTSTRAP:-}" ]; then
      "$here/kafka.sh" start
      # topics and the platform principal (SCRAM + ACLs) as the admin: needs the virtualenv (make setup)
      [ -x "$root/.venv/bin/python" ] || { echo "stack: no $root/.venv: run 'make setup' first" >&2; exit 1; }
      (cd "$root" && .venv/bin/python -m services.operator.cli kafka setup)
    else
      echo "kafka: using BUBUH_KAFKA_BOOTSTRAP=$BUBUH_KAFKA_BOOTSTRAP"
    fi
    if [ -z "${BUBUH_DATABASE_URL:-}" ]; then "$here/postgres.sh" start; else echo "postgres: using BUBUH_DATABASE_URL"; fi
    if [ -z "${BUBUH_SIGNING_TSA_URL:-}" ]; then "$here/pki.sh" start; else echo "pki: using BUBUH_SIGNING_TSA_URL=$BUBUH_SIGNING_TSA_URL"; fi
    ;;
  down)
    [ -n "${BUBUH_KAFKA_BOOTSTRAP:-}" ] || "$here/kafka.sh" stop
    [ -n "${BUBUH_DATABASE_URL:-}" ] || "$here/postgres.sh" stop
    [ -n "${BUBUH_SIGNING_TSA_URL:-}" ] || "$here/pki.sh" stop
    ;;
  status)
    rc=0
    [ -n "${BUBUH_KAFKA_BOOTSTRAP:-}" ] || "$here/kafka.sh" status || rc=1
    [ -n "${BUBUH_DATABASE_URL:-}" ] || "$here/postgres.sh" status || rc=1
    [ -n "${BUBUH_SIGNING_TSA_URL:-}" ] || "$here/pki.sh" status || rc=1
    exit $rc
    ;;
  env)  # the settings a process needs to reach this stack, as shell exports
    echo "export BUBUH_KAFKA_BOOTSTRAP=${BUBUH_KAFKA_BOOTSTRAP:-$("$here/kafka.sh" bootstrap)}"
    if [ -z "${BUBUH_KAFKA_BOOTSTRAP:-}" ]; then  # the local platform principal (SASL/SCRAM-SHA-512)
      creds=$("$here/kafka.sh" credentials)
      if [ -s "$creds/platform.json" ]; then
        echo "export BUBUH_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT BUBUH_KAFKA_SASL_MECHANISM=SCRAM-SHA-512"
        sed -n 's/.*"username": *"\([^"]*\)".*"password": *"\([^"]*\)".*/export BUBUH_KAFKA_USERNAME=\1 BUBUH_KAFKA_PASSWORD=\2/p' "$creds/platform.json"
      fi
    fi
    echo "export BUBUH_DATABASE_URL=${BUBUH_DATABASE_URL:-$("$here/postgres.sh" url)}"
    ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac

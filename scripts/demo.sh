#!/usr/bin/env bash
# The quickstart: finds or starts Postgres and Redis, creates the database `outbox_demo`
# afresh, applies the schema, starts a local SMTP catcher that keeps what it receives,
# registers it as the System Default Gateway, enqueues a message, runs the poller and
# workers until the message is delivered, and shows it — as the outbox saw it and as the
# SMTP server received it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/services.sh

export OUTBOX_DATABASE_URL=${OUTBOX_DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/outbox_demo}
export OUTBOX_REDIS_URL=${OUTBOX_REDIS_URL:-redis://127.0.0.1:6379/0}
export OUTBOX_REDIS_NAMESPACE=${OUTBOX_REDIS_NAMESPACE:-outbox-demo}
outbox=.venv/bin/outbox
maildir=.local/demo-mail

dbname=${OUTBOX_DATABASE_URL##*/}
psql -q -h 127.0.0.1 -U postgres -d postgres \
    -c "DROP DATABASE IF EXISTS \"$dbname\" WITH (FORCE)" -c "CREATE DATABASE \"$dbname\""
$outbox db init

port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rm -rf "$maildir"
$outbox catcher --port "$port" --maildir "$maildir" &
catcher=$!
trap 'kill $catcher 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

$outbox connector add demo-gateway --address gateway@example.com --direction outgoing \
    --host 127.0.0.1 --port "$port" --default-gateway
id=$($outbox send --from orders@example.com --from-name "Example Shop" --to you@example.org \
    --subject "Your order #1001" --text "Thank you for your order. It ships tomorrow.")
echo "enqueued message $id; running poller and workers until it is delivered"
$outbox run --until-idle
echo
$outbox show "$id"
echo
echo "--- as received by the SMTP catcher ($maildir) ---"
cat "$maildir"/*.eml

#!/usr/bin/env bash
# Make sure Postgres (127.0.0.1:5432, user postgres) and Redis (127.0.0.1:6379) answer;
# start them where they are not running. Never stops anything.
set -euo pipefail
cd "$(dirname "$0")/.."

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 -U postgres 2>/dev/null; }
redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }
wait_for() { for _ in $(seq 1 60); do "$1" && return 0; sleep 0.5; done; return 1; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v pg_isready >/dev/null || ! command -v redis-cli >/dev/null; then
    as_root apt-get update -qq && as_root apt-get install -y -qq postgresql redis-server >/dev/null
fi

if ! pg_up; then
    echo "starting Postgres" >&2
    if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ] && [ -n "$(ls /etc/postgresql)" ]; then
        as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start || true
    fi
    if ! wait_for pg_up; then
        # No system cluster: a private one under .local/pg with trust auth.
        bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
        data=$PWD/.local/pg
        if [ ! -s "$data/PG_VERSION" ]; then
            mkdir -p "$data"
            "${bindir:-/usr/bin}/initdb" -D "$data" -U postgres --auth=trust >/dev/null
        fi
        "${bindir:-/usr/bin}/pg_ctl" -D "$data" -l .local/pg.log -o "-p 5432 -k /tmp -c listen_addresses=127.0.0.1" start >/dev/null
    fi
    wait_for pg_up || { echo "Postgres did not come up" >&2; exit 1; }
fi

if ! redis_up; then
    echo "starting Redis" >&2
    mkdir -p .local
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --dir "$PWD/.local" --logfile "$PWD/.local/redis.log"
    wait_for redis_up || { echo "Redis did not come up" >&2; exit 1; }
fi

#!/usr/bin/env bash
# Run the whole test suite against real Postgres, Redis and in-process SMTP servers.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
scripts/test-tools.sh
scripts/services.sh
exec .venv/bin/python -m pytest "$@"

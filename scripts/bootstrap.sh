#!/usr/bin/env bash
# Create .venv with outbox-worker and its test tools installed. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "outbox-worker needs Python >= 3.11 ($python is $("$python" --version 2>&1))" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)
if [ ! -e "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[test,catcher]'
    rm -f .venv/.installed-* && touch "$stamp"
fi
# Bytecode for the project's own modules, as a wheel install has it: with
# PYTHONDONTWRITEBYTECODE set (as on the CI machine) every `outbox` process would otherwise
# compile them again (some 80 ms of its start-up). Stale files are ignored by Python.
.venv/bin/python -m compileall -q outbox worker >/dev/null

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

# The compose file is validated by the tests with Debian's docker-compose (no engine needed).
if ! command -v docker-compose >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing docker-compose (Debian package) to validate docker-compose.yml" >&2
        (apt-get install -y -qq docker-compose >/dev/null 2>&1 ||
         (apt-get update -qq >/dev/null && apt-get install -y -qq docker-compose >/dev/null))
    else
        echo "warning: docker-compose is not installed; the compose test will fail" >&2
    fi
fi

# The web console's browser tests drive Debian's Chromium through its ChromeDriver (no
# browser download works here; Selenium is pointed at /usr/bin/chromedriver).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing chromium and chromium-driver (Debian packages) for the browser tests" >&2
        (apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 ||
         (apt-get update -qq >/dev/null && apt-get install -y -qq chromium chromium-driver >/dev/null))
    else
        echo "warning: chromium or chromedriver is not installed; the browser tests will fail" >&2
    fi
fi

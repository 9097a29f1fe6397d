#!/usr/bin/env bash
# System tools the test suite needs besides .venv: Debian's docker-compose (validates
# docker-compose.yml without an engine) and Chromium with its ChromeDriver (the web console's
# browser tests; no browser download works here). Installed with apt-get only when running as
# root on a machine that has it (CI, a fresh container); otherwise it says what is missing.
# Only scripts/test.sh calls this: the demo needs none of it.
set -euo pipefail

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

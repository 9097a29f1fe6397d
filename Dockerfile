# outbox-worker: the `outbox` CLI (poller, workers, operator commands) on Python 3.11.
#
#   docker build -t outbox-worker .
#   docker run --rm -e OUTBOX_DATABASE_URL=... -e OUTBOX_REDIS_URL=... outbox-worker poll
#
# No compilers needed: psycopg comes as psycopg[binary] and every other dependency ships
# wheels for CPython 3.11 on Linux.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Only what the wheel is built from (pyproject.toml, the README it names, the schema it
# force-includes, and the two packages), so the rest of the checkout does not matter.
WORKDIR /src
COPY pyproject.toml README.md schema.sql ./
COPY outbox/ outbox/
COPY worker/ worker/

# [catcher] adds aiosmtpd for `outbox catcher`. The source tree is removed afterwards so
# nothing can import it instead of the installed package (`outbox worker --processes N`
# starts its children with `python -m outbox.cli`, which puts the working directory first
# on sys.path).
RUN pip install ".[catcher]" \
 && cd / && rm -rf /src \
 && groupadd --system --gid 10001 outbox \
 && useradd --system --uid 10001 --gid outbox --home-dir /home/outbox --create-home \
        --shell /usr/sbin/nologin outbox

WORKDIR /home/outbox
# Numeric, so orchestrators can check runAsNonRoot.
USER 10001:10001

ENTRYPOINT ["outbox"]
CMD ["--help"]

# syntax=docker/dockerfile:1
#
# mx-relay container image.
#
#   docker build -t mx-relay .
#   docker run -d --name relay -p 25:25 -p 127.0.0.1:9025:9025 \
#       -v relay-queue:/var/lib/relay -v "$PWD/relay.toml:/etc/relay/relay.toml:ro" mx-relay
#
# Port 25 and a non-root user: Docker >= 20.10 sets
# `net.ipv4.ip_unprivileged_port_start=0` inside a container's own network
# namespace, so uid 10025 binds port 25 there with no capability at all (the
# image runs unchanged under `--cap-drop ALL` and no-new-privileges).
# Where that sysctl is not set (`--network host`, older engines, Kubernetes
# pods without it), listen on an unprivileged port and map it:
#   docker run -e RELAY_LISTEN=0.0.0.0:2525 -p 25:2525 ... mx-relay
# Not taken: `setcap cap_net_bind_service=+ep` on the interpreter would hand
# the capability to every Python program in the image (healthcheck, `relay
# queue ...`, `docker exec`), and makes every python exec fail with EPERM
# under `--cap-drop ALL`.

# ---- builder: the project's wheel plus wheels of all its dependencies -------
FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest out).
COPY pyproject.toml README.md ./
COPY migrations/ migrations/
COPY relay/ relay/

# `postgresql` adds psycopg for a postgresql+psycopg:// queue.url; build with
# `--build-arg EXTRAS=` for a SQLite-only image.
ARG EXTRAS=postgresql
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".${EXTRAS:+[$EXTRAS]}"

# ---- runtime: a venv installed from those wheels, no compilers, no sources --
FROM python:3.11-slim-bookworm

ENV PATH=/opt/relay/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAY_CONFIG=/etc/relay/relay.toml

# Fixed uid/gid so a host directory or volume can be chowned to 10025:10025.
RUN groupadd --system --gid 10025 relay \
 && useradd --system --uid 10025 --gid relay --no-create-home \
        --home-dir /var/lib/relay --shell /usr/sbin/nologin relay \
 && install -d -o relay -g relay -m 0750 /var/lib/relay

# Offline install (--no-index) from the builder's wheels: pip still checks
# that they satisfy every dependency. The wheels never land in a layer.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/relay \
 && /opt/relay/bin/pip install --no-cache-dir --no-index --find-links=/wheels /wheels/*.whl \
 && /opt/relay/bin/pip check

COPY --chmod=0644 config/docker.toml /etc/relay/relay.toml
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/relay-entrypoint

USER 10025:10025
WORKDIR /var/lib/relay
# The SQLite queue (queue.db plus its -wal/-shm files): keep it on a volume.
VOLUME ["/var/lib/relay"]
EXPOSE 25 9025

# /healthz on metrics.listen: 200 when the listener is up and the database
# answers. Plain urllib (no curl in the image); a 503 or a refused connection
# raises, and python exits 1. Set RELAY_HEALTHCHECK_URL if you move metrics.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; url = os.environ.get('RELAY_HEALTHCHECK_URL', 'http://127.0.0.1:9025/healthz'); sys.exit(u.urlopen(url, timeout=4).status != 200)"]

# relay serve stops on SIGTERM: closes the listeners, lets messages still
# arriving finish for up to smtp.shutdown_grace (10 s), then in-flight
# deliveries for up to 20 s, and exits 0. Docker's default stop timeout is
# 10 s: run with `--stop-timeout 40` (compose: `stop_grace_period: 40s`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["relay-entrypoint"]
CMD ["serve"]

# syntax=docker/dockerfile:1
# One image for every abstream role; the command picks it: gateway, worker, migrate.

FROM python:3.11-slim AS build

# A compiler only for dependencies without a wheel for the target (faust-streaming ships none
# for aarch64); it stays in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md LICENSE tests.json ./
COPY clickhouse/ clickhouse/
COPY abstream/ abstream/
COPY gateway/ gateway/
COPY schemas/ schemas/
COPY stream_workers/ stream_workers/
# Runtime dependencies only: the "embedded" extra (tansu, chDB) stands in for Kafka and
# ClickHouse on machines without them and has no place next to the real servers.
RUN --mount=type=cache,target=/root/.cache/pip pip install .


FROM python:3.11-slim

# The wheel installs the migrations and an example manifest under /opt/venv/share/abstream, used when the
# working directory has none; the deployment's own manifest and migrations are set explicitly here.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    ABSTREAM_MANIFEST=/opt/abstream/tests.json \
    ABSTREAM_MIGRATIONS_DIR=/opt/abstream/clickhouse \
    ABSTREAM_DATA_DIR=/var/lib/abstream

RUN groupadd --system --gid 10001 abstream \
 && useradd --system --uid 10001 --gid abstream --home-dir /var/lib/abstream --create-home \
      --shell /usr/sbin/nologin abstream

COPY --from=build /opt/venv /opt/venv
# Owned by root and read-only to the service user: the processes read these, never write them.
COPY tests.json /opt/abstream/tests.json
COPY clickhouse/ /opt/abstream/clickhouse/

USER abstream
WORKDIR /var/lib/abstream

# Gateway HTTP; the worker's Faust web (health) port.
EXPOSE 20000 6066

ENTRYPOINT ["abstream"]
CMD ["gateway", "--host", "0.0.0.0"]

#!/bin/bash
# The read-only ClickHouse user that Grafana (and analysts) query with: GRAFANA_CLICKHOUSE_USER, identified by
# GRAFANA_CLICKHOUSE_PASSWORD, with readonly = 1 and SELECT on CLICKHOUSE_DB (abstream) only. It cannot insert,
# alter, drop or create anything, and cannot change settings except max_execution_time, which the Grafana
# ClickHouse plugin's driver sets on its queries (CHANGEABLE_IN_READONLY; needs the server's default
# access_control_improvements.settings_constraints_replace_previous = true).
#
# docker-compose.yml mounts this directory as clickhouse-server's /docker-entrypoint-initdb.d. The image's
# entrypoint runs this script (or sources it, when it is not executable) ONLY WHEN THE DATA VOLUME IS FRESH (no
# /var/lib/clickhouse/data yet), once CLICKHOUSE_DB and the CLICKHOUSE_USER writer exist, on a temporary server
# listening on 127.0.0.1. An existing volume never runs it again: to add or change the user there, run it by hand
# (it is idempotent), e.g.
#   docker compose exec clickhouse bash /docker-entrypoint-initdb.d/10-grafana-reader.sh
#
# It may be sourced by the entrypoint (set -e, no `exit`, no `set -u`, variables unset at the end).
set -e

: "${CLICKHOUSE_USER:?CLICKHOUSE_USER (the writer that creates the reader) is not set}"
: "${CLICKHOUSE_DB:?CLICKHOUSE_DB (the database to grant) is not set}"
: "${GRAFANA_CLICKHOUSE_USER:?GRAFANA_CLICKHOUSE_USER (the read-only user to create) is not set}"
: "${GRAFANA_CLICKHOUSE_PASSWORD:?GRAFANA_CLICKHOUSE_PASSWORD is not set}"

case "$GRAFANA_CLICKHOUSE_USER" in
    "" | [0-9]* | *[!A-Za-z0-9_]*)
        echo "GRAFANA_CLICKHOUSE_USER must be a plain identifier (letters, digits, _): $GRAFANA_CLICKHOUSE_USER" >&2
        false
        ;;
esac
case "$CLICKHOUSE_DB" in
    "" | [0-9]* | *[!A-Za-z0-9_]*)
        echo "CLICKHOUSE_DB must be a plain identifier: $CLICKHOUSE_DB" >&2
        false
        ;;
esac
if [ "$GRAFANA_CLICKHOUSE_USER" = "$CLICKHOUSE_USER" ] || [ "$GRAFANA_CLICKHOUSE_USER" = default ]; then
    echo "GRAFANA_CLICKHOUSE_USER must name a user of its own, not $GRAFANA_CLICKHOUSE_USER" >&2
    false
fi

# The password as a single-quoted SQL string literal: backslashes and quotes escaped. It goes to the client on
# stdin, so it does not show in the process list.
_abstream_reader_pw=${GRAFANA_CLICKHOUSE_PASSWORD//\\/\\\\}
_abstream_reader_pw=${_abstream_reader_pw//\'/\\\'}

clickhouse-client --host 127.0.0.1 --user "$CLICKHOUSE_USER" --password "${CLICKHOUSE_PASSWORD:-}" --multiquery <<SQL
CREATE SETTINGS PROFILE OR REPLACE abstream_reader
    SETTINGS readonly = 1, max_execution_time = 60 MIN 1 MAX 3600 CHANGEABLE_IN_READONLY;
CREATE USER OR REPLACE ${GRAFANA_CLICKHOUSE_USER}
    IDENTIFIED WITH sha256_password BY '${_abstream_reader_pw}'
    DEFAULT DATABASE ${CLICKHOUSE_DB}
    SETTINGS PROFILE abstream_reader;
GRANT SELECT ON ${CLICKHOUSE_DB}.* TO ${GRAFANA_CLICKHOUSE_USER};
SQL

echo "$0: read-only user ${GRAFANA_CLICKHOUSE_USER} can SELECT on ${CLICKHOUSE_DB}.*"
unset _abstream_reader_pw

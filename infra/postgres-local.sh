#!/usr/bin/env bash
# A private PostgreSQL for the MLflow and Prefect servers on one machine, without docker:
#   infra/postgres-local.sh start   # initdb on first use, start, create databases mlflow and prefect,
#                                   # print the two connection URLs for the servers' environment
#   infra/postgres-local.sh stop
# It opens no TCP port: it listens only on a Unix socket in $KD_PG_DIR/socket (mode 0700), so only
# this user (and root) can connect, and no password exists to leak. As root it runs the server as the
# `postgres` user, since PostgreSQL refuses root; then every parent of KD_PG_DIR must be traversable.
#   KD_PG_DIR (default ./.kd/postgres), KD_PG_BIN (default: the newest /usr/lib/postgresql/*/bin)
# Debian/Ubuntu: apt-get install -y postgresql
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dir="${KD_PG_DIR:-${here}/.kd/postgres}"
bin="${KD_PG_BIN:-$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -1)}"
[ -x "${bin}/initdb" ] || { echo "postgres-local.sh: no PostgreSQL found (apt-get install -y postgresql, or set KD_PG_BIN)" >&2; exit 2; }
as_owner() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
sock="${dir}/socket"
case "${1:-}" in
  start)
    mkdir -p "${sock}"
    [ "$(id -u)" = 0 ] && chown -R postgres: "${dir}"
    chmod 700 "${dir}" "${sock}"
    [ -f "${dir}/data/PG_VERSION" ] || as_owner "${bin}/initdb" -D "${dir}/data" -U kd --auth=trust -E UTF8 >/dev/null
    as_owner "${bin}/pg_ctl" -D "${dir}/data" status >/dev/null 2>&1 \
      || as_owner "${bin}/pg_ctl" -D "${dir}/data" -l "${dir}/postgres.log" -w -t 60 \
           -o "-c listen_addresses='' -c unix_socket_directories='${sock}'" start >/dev/null
    for db in mlflow prefect; do
      as_owner "${bin}/psql" -h "${sock}" -U kd -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '${db}'" \
        | grep -q 1 || as_owner "${bin}/createdb" -h "${sock}" -U kd "${db}"
    done
    echo "MLFLOW_BACKEND_STORE_URI=postgresql://kd@/mlflow?host=${sock}"
    echo "PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://kd@/prefect?host=${sock}"
    ;;
  stop)
    as_owner "${bin}/pg_ctl" -D "${dir}/data" -m fast -w stop >/dev/null
    ;;
  *)
    echo "usage: $0 start|stop" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A Prefect server for scheduled runs, without docker. Settings from the environment:
#   PREFECT_API_DATABASE_CONNECTION_URL  postgresql+asyncpg://kd@/prefect?host=/path/to/socket
#                                        (infra/postgres-local.sh) or any PostgreSQL (default: sqlite in PREFECT_HOME)
#   PREFECT_SERVER_API_HOST (default 127.0.0.1: this machine only), PREFECT_SERVER_API_PORT (default 4200)
#   PREFECT_SERVER_API_AUTH_STRING       "user:password": require basic auth (clients set PREFECT_API_AUTH_STRING).
#                                        Required whenever the host is not loopback.
# Then, for kd serve, workers and `prefect deploy`: export PREFECT_API_URL=http://127.0.0.1:4200/api
# KD_BIN: where the executables are (default: the project's .venv/bin, else PATH).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${KD_BIN:-${here}/.venv/bin}"; [ -x "${bin}/prefect" ] || bin="$(dirname "$(command -v prefect)")"
host="${PREFECT_SERVER_API_HOST:-127.0.0.1}"
case "${host}" in
  127.*|localhost|::1) ;;
  *) [ -n "${PREFECT_SERVER_API_AUTH_STRING:-}" ] || { echo "prefect-server.sh: ${host} is not loopback: set PREFECT_SERVER_API_AUTH_STRING" >&2; exit 2; } ;;
esac
export PREFECT_HOME="${PREFECT_HOME:-${here}/.prefect}"
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
exec "${bin}/prefect" server start --host "${host}" --port "${PREFECT_SERVER_API_PORT:-4200}"

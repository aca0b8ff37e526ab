#!/usr/bin/env bash
# A Prefect server for scheduled runs, bound to localhost by default (PREFECT_SERVER_API_HOST to change).
# Its database is PREFECT_API_DATABASE_CONNECTION_URL (default: sqlite under PREFECT_HOME).
# Then: export PREFECT_API_URL=http://127.0.0.1:4200/api
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
export PREFECT_HOME="${PREFECT_HOME:-${here}/.prefect}"
exec "${here}/.venv/bin/prefect" server start \
  --host "${PREFECT_SERVER_API_HOST:-127.0.0.1}" --port "${PREFECT_SERVER_API_PORT:-4200}"

#!/usr/bin/env bash
# The Dask scheduler that `cache.dask_address` points at (docs/dask.md). It binds to this machine only
# by default; workers on other hosts need it on a private network, and never on a public one without TLS:
#   DASK_HOST (default 127.0.0.1)  the address to listen on, e.g. this host's private-network IP
#   DASK_PORT (default 8786)       params.yaml then says cache.dask_address: tcp://DASK_HOST:DASK_PORT
#   DASK_TLS_DIR                   a folder with ca.pem, cert.pem, key.pem: serve tls:// only (workers and
#                                  the stage then need the same certificates; see docs/dask.md)
#   DASK_DASHBOARD_PORT (8787)     the dashboard (and /health), on 127.0.0.1 only: reach it over ssh -L
#   DASK_ALLOWED_FAILURES (2)      a shard is run again after its worker dies, up to this many deaths
# Extra arguments go to `dask scheduler` (e.g. --scheduler-file /shared/scheduler.json).
# KD_BIN: where the executables are (default: the project's .venv/bin, else PATH).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${KD_BIN:-${here}/.venv/bin}"; [ -x "${bin}/dask" ] || bin="$(dirname "$(command -v dask)")"
host="${DASK_HOST:-127.0.0.1}"
tls=(); protocol=tcp
if [ -n "${DASK_TLS_DIR:-}" ]; then
  protocol=tls
  tls=(--tls-ca-file "${DASK_TLS_DIR}/ca.pem" --tls-cert "${DASK_TLS_DIR}/cert.pem" --tls-key "${DASK_TLS_DIR}/key.pem")
else
  case "${host}" in
    127.*|localhost|::1) ;;
    *) echo "dask-scheduler.sh: listening on ${host} without TLS: anyone who reaches it can run code on the" \
            "workers; keep it on a private network, or set DASK_TLS_DIR" >&2 ;;
  esac
fi
export DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="${DASK_ALLOWED_FAILURES:-2}"
exec "${bin}/dask" scheduler --protocol "${protocol}" --host "${host}" --port "${DASK_PORT:-8786}" \
  --dashboard-address "127.0.0.1:${DASK_DASHBOARD_PORT:-8787}" "${tls[@]}" "$@"

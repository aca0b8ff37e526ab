#!/usr/bin/env bash
# A Prefect worker that runs the kd DAG's scheduled flow runs as local processes (prefect.yaml's
# `local` deployment). Needs PREFECT_API_URL (and PREFECT_API_AUTH_STRING if the server asks), and the
# environment the flow runs need: MLFLOW_TRACKING_URI (+ MLFLOW_TRACKING_USERNAME/PASSWORD),
# KD_ALERT_WEBHOOK for failure alerts. Extra arguments go to `prefect worker start` (e.g. --run-once).
#   KD_WORK_POOL (default kd-process): created as a process pool if it does not exist.
# KD_BIN: where the executables are (default: the project's .venv/bin, else PATH).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${KD_BIN:-${here}/.venv/bin}"; [ -x "${bin}/prefect" ] || bin="$(dirname "$(command -v prefect)")"
: "${PREFECT_API_URL:?set PREFECT_API_URL, e.g. http://127.0.0.1:4200/api}"
export PATH="${bin}:${PATH}"  # the flow's stages run `kd` and `dvc` of this environment
pool="${KD_WORK_POOL:-kd-process}"
"${bin}/prefect" work-pool inspect "${pool}" >/dev/null 2>&1 || "${bin}/prefect" work-pool create "${pool}" --type process >/dev/null
exec "${bin}/prefect" worker start --pool "${pool}" --type process "$@"

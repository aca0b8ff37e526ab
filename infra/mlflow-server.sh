#!/usr/bin/env bash
# A shared MLflow tracking server + model registry for a team, without docker. Nothing secret is
# committed: the stores come from the environment (MLflow itself reads MLFLOW_BACKEND_STORE_URI, so a
# password in it never shows in `ps`):
#   MLFLOW_BACKEND_STORE_URI      postgresql://kd@/mlflow?host=/path/to/socket (infra/postgres-local.sh),
#                                 postgresql://user:pass@db:5432/mlflow, ...   (default: sqlite file here)
#   MLFLOW_ARTIFACTS_DESTINATION  s3://kd-artifacts (with MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID and
#                                 AWS_SECRET_ACCESS_KEY for MinIO) or a directory (default: ./mlartifacts)
#   MLFLOW_HOST (default 127.0.0.1: this machine only), MLFLOW_PORT (default 5000), MLFLOW_WORKERS (2)
#   MLFLOW_AUTH=basic-auth        require a login (MLflow's basic auth; clients set MLFLOW_TRACKING_USERNAME
#                                 and MLFLOW_TRACKING_PASSWORD). Set it whenever MLFLOW_HOST is not loopback.
# Clients (kd, workers): export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
# KD_BIN: where the executables are (default: the project's .venv/bin, else PATH).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${KD_BIN:-${here}/.venv/bin}"; [ -x "${bin}/mlflow" ] || bin="$(dirname "$(command -v mlflow)")"
host="${MLFLOW_HOST:-127.0.0.1}"
case "${host}" in
  127.*|localhost|::1) ;;
  *) [ "${MLFLOW_AUTH:-}" = basic-auth ] || { echo "mlflow-server.sh: MLFLOW_HOST=${host} is not loopback: set MLFLOW_AUTH=basic-auth" >&2; exit 2; } ;;
esac
export MLFLOW_BACKEND_STORE_URI="${MLFLOW_BACKEND_STORE_URI:-sqlite:///${here}/mlflow-server.db}"
auth=(); [ -n "${MLFLOW_AUTH:-}" ] && auth=(--app-name "${MLFLOW_AUTH}")
exec "${bin}/mlflow" server \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-${here}/mlartifacts}" \
  --serve-artifacts "${auth[@]}" \
  --host "${host}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-2}"

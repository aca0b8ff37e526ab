#!/usr/bin/env bash
# A shared MLflow tracking server + model registry for a team, bound to localhost by default.
# Backend and artifact store come from the environment (nothing secret is committed):
#   MLFLOW_BACKEND_STORE_URI  e.g. postgresql://user:pass@db:5432/mlflow  (default: sqlite file here)
#   MLFLOW_ARTIFACTS_DESTINATION  e.g. s3://kd-artifacts                   (default: ./mlartifacts)
#   MLFLOW_HOST (default 127.0.0.1), MLFLOW_PORT (default 5000)
# Point the pipeline at it with: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
exec "${here}/.venv/bin/mlflow" server \
  --backend-store-uri "${MLFLOW_BACKEND_STORE_URI:-sqlite:///${here}/mlflow-server.db}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-${here}/mlartifacts}" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-2}"

#!/usr/bin/env bash
# The GPU variant of infra/dask-worker.sh: `dask cuda worker` starts one worker per visible GPU, each
# pinned to its own device (CUDA_VISIBLE_DEVICES picks which). Needs dask-cuda, which kd does not
# install (pip install dask-cuda, matching this environment's dask and CUDA).
#   usage: infra/dask-cuda-worker.sh tcp://SCHEDULER:8786 [more `dask cuda worker` arguments]
# The same shared paths and kd_core as infra/dask-worker.sh; params.yaml sets cache.device: cuda (or auto).
# KD_BIN: where the executables are (default: the project's .venv/bin, else PATH).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${KD_BIN:-${here}/.venv/bin}"; [ -x "${bin}/python" ] || bin="$(dirname "$(command -v python3)")"
[ $# -ge 1 ] || { echo "usage: $0 tcp://SCHEDULER:8786 [dask cuda worker arguments]" >&2; exit 2; }
"${bin}/python" -c "import dask_cuda" 2>/dev/null || {
  echo "dask-cuda-worker.sh: dask-cuda is not installed in ${bin}: pip install dask-cuda (or use" \
       "infra/dask-worker.sh for CPU workers)" >&2; exit 3; }
tls=()
[ -n "${DASK_TLS_DIR:-}" ] && tls=(--tls-ca-file "${DASK_TLS_DIR}/ca.pem" --tls-cert "${DASK_TLS_DIR}/cert.pem" \
                                 --tls-key "${DASK_TLS_DIR}/key.pem")
# memory-limit 0: pinned shard buffers must not count against a worker's share of host RAM
exec "${bin}/dask" cuda worker --nthreads 1 --memory-limit 0 --no-dashboard \
  --local-directory "${PWD}/dask-worker-space" "${tls[@]}" "$@"

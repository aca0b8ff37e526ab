#!/usr/bin/env bash
# A CPU Dask worker for `cache.dask_address` (docs/dask.md): one worker running one shard at a time, the
# teacher using every core for it. Start one per host, each in a folder of its own (its scratch space);
# for GPU hosts use infra/dask-cuda-worker.sh instead.
#   usage: infra/dask-worker.sh tcp://SCHEDULER:8786 [more `dask worker` arguments]
# The host must see the project's teacher, prepared data and store (paths.work) at the same absolute
# paths as the machine running `kd stage cache_logits` (a shared filesystem), and run the same kd_core
# (same version and source): every task checks both and refuses with one line otherwise.
#   DASK_TLS_DIR   ca.pem, cert.pem, key.pem when the scheduler serves tls:// (infra/dask-scheduler.sh)
# KD_BIN: where the executables are (default: the project's .venv/bin, else PATH).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${KD_BIN:-${here}/.venv/bin}"; [ -x "${bin}/dask" ] || bin="$(dirname "$(command -v dask)")"
[ $# -ge 1 ] || { echo "usage: $0 tcp://SCHEDULER:8786 [dask worker arguments]" >&2; exit 2; }
tls=()
[ -n "${DASK_TLS_DIR:-}" ] && tls=(--tls-ca-file "${DASK_TLS_DIR}/ca.pem" --tls-cert "${DASK_TLS_DIR}/cert.pem" \
                                 --tls-key "${DASK_TLS_DIR}/key.pem")
# one thread: a shard's forward pass already uses the cores; --local-directory: spill files stay here
exec "${bin}/dask" worker --nworkers 1 --nthreads 1 --no-dashboard --local-directory "${PWD}/dask-worker-space" \
  "${tls[@]}" "$@"

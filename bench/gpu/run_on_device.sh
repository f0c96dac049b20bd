#!/usr/bin/env bash
# On the lent GPU machine, from the repository root, with bench/gpu/wheels carried (bash bench/gpu/wheels.sh here):
#
#     bash bench/gpu/run_on_device.sh            # --quick: at most 8 minutes (cli.LIMIT + a case's overrun)
#     bash bench/gpu/run_on_device.sh --full     # every case: under 10 minutes
#     bash bench/gpu/run_on_device.sh --parts e2e,flce   # any further flags go to python -m bench.gpu
#
# Installs the wheels into a temporary folder (no network), runs python -m bench.gpu and writes gpu_bench.json,
# table.txt and log.txt to $OUT (the device tool's return folder; /tmp/gpu-bench elsewhere). A hard timeout stops
# the run even if a part's own budget fails to; the JSON holds every part finished by then.
set -uo pipefail
cd "$(dirname "$0")/../.."

OUT=${OUT:-/tmp/gpu-bench}
mkdir -p "$OUT"
mode=(--quick)
limit=475  # > cli.LIMIT['quick'] (465) + cli.CASE_OVERRUN_S, <= 480 (tests/bench/test_gpu_e2e.py checks it)
if [ "${1:-}" = "--full" ]; then
    mode=()
    limit=590  # > cli.LIMIT['full'] (570) + cli.CASE_OVERRUN_S, under a device call's 600 s
    shift
fi
export PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1  # the warm-up's FlexAttention compiles reused
unset TRITON_INTERPRET

nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,utilization.gpu --format=csv 2>&1 | tee "$OUT/log.txt"
timeout -k 15 "$limit" python3 -m bench.gpu --output "$OUT" --wheels bench/gpu/wheels ${mode[@]+"${mode[@]}"} "$@" 2>&1 \
    | tee -a "$OUT/log.txt"
rc=${PIPESTATUS[0]}
echo "bench.gpu exit code: $rc (124: stopped by the ${limit} s timeout)" | tee -a "$OUT/log.txt"
exit "$rc"

#!/usr/bin/env bash
# Item 6 of the benchmark suite (see BENCHMARKS.md): feature statistics and eigendecomposition
# of a width-4096 synthetic input, and fine-tuning steps of the default model, on the GPU,
# printed against the same work on this machine's CPU and against the card's measured matrix
# rate. Bounded to 280 s so that it fits in 5 minutes of device time.
#
#   bench/gpu.sh                       # needs CUDA
#   bench/gpu.sh --cpu                 # no GPU: the same script on the CPU, tiny sizes (smoke test)
#   bench/gpu.sh --json gpu.json       # also write the figures as JSON
#
# Other options: --width, --tokens, --steps, --cpu-threads (python -m bench.bench_gpu --help).
#
#   bench/gpu.sh scale [--bed DIR]     # issue 26: bench_scale on the 8B shape (Llama-3-8B's config,
#                                      # random weights drawn on the GPU, 8 r16 adapters), on CUDA:
#                                      # diagnose projected vs dense and the merges against peft
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
if [[ "${1:-}" == "scale" ]]; then
  shift
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  exec timeout --signal=INT --kill-after=10 540 python -m bench.bench_scale --shape 8b --device cuda \
    --bed "${OSRM_SCALE_BED:-/tmp/osrm-scale-bed-8b}" --adapters 2,8 --methods ties,tsv_m --timeout 240 "$@"
fi
if [[ " $* " != *" --cpu "* ]]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
fi
exec timeout --signal=INT --kill-after=10 280 python -m bench.bench_gpu "$@"

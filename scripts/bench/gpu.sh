#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the parity tests on the GPU, then the bf16 training-step MFU
# benchmark of a 1B Llama-2-shaped model with cuDNN flash attention (scripts/bench/gpu_mfu.py).
#
#   bash scripts/bench/gpu.sh [OUT_DIR]
#
# Needs a venv with CUDA jax, e.g.  python -m venv .venv && .venv/bin/pip install -e ".[test]" "jax[cuda12]"
# (PY=path/to/python to use another).  Results: OUT_DIR/gpu_mfu.json and the log; record them in
# docs/benchmarks.md.  The parity tests compare against CPU torch (the test extra pins a CPU build).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${1:-${OUT:-runs/gpu-bench}}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
# fp32 parity on the GPU: full-precision matmuls (XLA's GPU default is TF32 for fp32 dots)
JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -q \
    tests/test_model_parity.py tests/test_lora.py 2>&1 | tee "$OUT/parity.log"
"$PY" scripts/bench/gpu_mfu.py --json "$OUT/gpu_mfu.json" "${@:2}" 2>&1 | tee "$OUT/gpu_mfu.log"
# the batching modes' attention paths (docs/plan.md): right-padded buckets through cuDNN with sequence
# lengths, packed rows through XLA's dense mask (auto) and through cuDNN with the mask as a bias
for run in "padded auto" "packed auto" "packed cudnn"; do
    set -- $run
    "$PY" scripts/bench/gpu_mfu.py --no-peer --layout "$1" --attention "$2" --json "$OUT/gpu_mfu_$1_$2.json" \
        2>&1 | tee "$OUT/gpu_mfu_$1_$2.log"
done

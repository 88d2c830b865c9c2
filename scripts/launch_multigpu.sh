#!/usr/bin/env bash
# Run a llama-jax stage on GPU hosts.
# One host with N GPUs: one process sees all GPUs; the mesh (fsdp=-1 by default) spans them.
#   scripts/launch_multigpu.sh pretrain configs/chinese-llama2-7b/pretrain-lora.yaml --out runs/pt-lora
# Several hosts: run this on every host with the coordinator's address and this host's rank
# (rank 0 is the coordinator); --out must be on a shared filesystem.
#   NNODES=2 NODE_RANK=0 COORDINATOR=10.0.0.1:12355 scripts/launch_multigpu.sh pretrain CONFIG --out /shared/runs/x
# Under SLURM, jax.distributed.initialize() reads the job itself: set LLAMA_JAX_DISTRIBUTED=1 instead.
set -euo pipefail
cd "$(dirname "$0")/.."
test -x .venv/bin/llama-jax || make install
# GPU wheels: the CUDA 12 plugin matching the installed jax
.venv/bin/python -c 'import jax; jax.devices("gpu")' 2>/dev/null || \
  .venv/bin/pip install -q "jax[cuda12]==$(.venv/bin/python -c 'import jax; print(jax.__version__)')"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
if [ "${NNODES:-1}" -gt 1 ]; then
  export LLAMA_JAX_COORDINATOR=${COORDINATOR:?set COORDINATOR=host:port} LLAMA_JAX_NUM_PROCESSES=$NNODES \
         LLAMA_JAX_PROCESS_ID=${NODE_RANK:?set NODE_RANK}
fi
exec .venv/bin/llama-jax "$@"

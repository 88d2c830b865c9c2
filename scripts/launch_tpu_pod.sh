#!/usr/bin/env bash
# Run a llama-jax stage on every worker of a TPU VM pod slice.
#   scripts/launch_tpu_pod.sh TPU_NAME ZONE pretrain configs/chinese-llama2-7b/pretrain-lora.yaml --out /mnt/runs/pt-lora
# Every worker runs the same command; jax.distributed.initialize() finds the pod by itself
# (LLAMA_JAX_DISTRIBUTED=1).  --out must be a filesystem all workers share (Filestore/NFS or a
# gcsfuse mount) so orbax checkpoints are written once and every worker resumes from them.
set -euo pipefail
TPU_NAME=$1; ZONE=$2; shift 2
REPO_DIR=${REPO_DIR:-llama_jax}
CMD="cd $REPO_DIR && (test -x .venv/bin/llama-jax || make install) && pip_extra=\$(test -d .venv/lib/python3*/site-packages/libtpu || echo 1); \
  if [ -n \"\$pip_extra\" ]; then .venv/bin/pip install -q \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\"; fi; \
  LLAMA_JAX_DISTRIBUTED=1 .venv/bin/llama-jax $*"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$CMD"

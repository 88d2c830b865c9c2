"""The toy pretraining job as 2 local JAX processes (gloo CPU collectives) gets the 1-process losses."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["pretrain", os.path.join(REPO, "configs", "toy", "pretrain.yaml"), "data.block_size=64",
        "train.batch_size=8", "data.max_documents=300", "train.progress=false", "train.steps=4", "train.log_every=1",
        "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=2", "mesh.fsdp=-1"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, data_dir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # reference: one process holding 2 devices
    one = subprocess.run([sys.executable, "-m", "llama_jax.cli", *ARGS, "--out", str(tmp_path / "one")],
                         env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "llama_jax.cli", *ARGS, "--out", str(tmp_path / "two")],
                              env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                                   "LLAMA_JAX_COORDINATOR": f"127.0.0.1:{port}", "LLAMA_JAX_NUM_PROCESSES": "2",
                                   "LLAMA_JAX_PROCESS_ID": str(i), "LLAMA_JAX_CPU_COLLECTIVES": "gloo"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], rtol=1e-5)
    np.testing.assert_allclose([m["eval_loss"] for m in b if "eval_loss" in m],
                               [m["eval_loss"] for m in a if "eval_loss" in m], rtol=1e-5)
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "4"]

"""Pretraining on the shared loop: perplexity falls, exact resume after SIGKILL, sharded == single, bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llama_jax.data.sources import DataError
from llama_jax.stages import pretrain
from llama_jax.train.config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "toy", "pretrain.yaml")
SMALL = ["data.block_size=64", "train.batch_size=8", "data.max_documents=600", "train.progress=false",
         "train.eval_batches=2"]


def _cfg(*over):
    return load_config(pretrain.PretrainConfig, CONFIG, SMALL + list(over))


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def test_eval_perplexity_falls(tmp_path, data_dir):
    r = pretrain.run_config(_cfg("train.steps=40", "train.log_every=10", "train.eval_every=8",
                                 "train.checkpoint_every=0", "mesh.fsdp=1"), str(tmp_path / "run"))
    ms = _metrics(r["run_dir"])
    # eval keeps its own schedule: steps that are not logging steps get an eval-only record
    assert [m["step"] for m in ms if "eval_loss" in m] == [8, 16, 24, 32, 40]
    assert [m["step"] for m in ms if "loss" in m] == [10, 20, 30, 40]
    evals = [m["eval_loss"] for m in ms if "eval_loss" in m]
    assert all(b < a for a, b in zip(evals, evals[1:])), evals  # falls at every eval
    assert evals[0] < np.log(32000) and evals[-1] < evals[0] - 0.5, evals
    assert r["eval_ppl"] == pytest.approx(np.exp(evals[-1]))
    # the run exports as an HF directory that transformers loads with the same logits
    import torch
    import transformers
    import jax.numpy as jnp
    from llama_jax.cli import main

    out = tmp_path / "hf"
    assert main(["export", "--model", r["run_dir"], "--out", str(out)]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("人工智能是计算机科学的一个分支")["input_ids"]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(r["model"](jnp.asarray([ids]))), ref, atol=1e-4)


def _cli(run_dir, *extra, env=None):
    cmd = [sys.executable, "-m", "llama_jax.cli", "pretrain", CONFIG, "--out", str(run_dir), *SMALL,
           "train.steps=12", "train.log_every=2", "train.eval_every=4", "train.checkpoint_every=4", "mesh.fsdp=1",
           *extra]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, cwd=REPO)


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path, data_dir):
    ref = _cli(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "killed"
    k = _cli(run, env={"LLAMA_JAX_TEST_KILL_AT_STEP": "10"})
    assert k.returncode == -9, k.stderr[-2000:]
    steps = sorted(int(p) for p in os.listdir(run / "checkpoints") if p.isdigit())
    assert steps == [4, 8]
    # a checkpoint torn mid-write (as orbax leaves it when killed) must be ignored
    (run / "checkpoints" / "12.orbax-checkpoint-tmp-0").mkdir()
    again = _cli(run)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from checkpoint at step 8" in again.stdout
    timing = {"tokens_per_sec", "mfu", "step_time"}
    a = [{k: v for k, v in m.items() if k not in timing} for m in _metrics(tmp_path / "ref")]
    b = [{k: v for k, v in m.items() if k not in timing} for m in _metrics(run)]
    assert [m["step"] for m in b] == [2, 4, 6, 8, 10, 12]
    assert a == b  # bitwise: JSON floats are exact reprs


def test_sharded_training_matches_single_device(tmp_path, data_dir):
    common = ["train.steps=6", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0"]
    single = pretrain.run_config(_cfg(*common, "mesh.fsdp=1"), str(tmp_path / "single"))
    sharded = pretrain.run_config(_cfg(*common, "mesh.fsdp=4", "mesh.tensor=2"), str(tmp_path / "sharded"))
    ls = [m["loss"] for m in _metrics(single["run_dir"])]
    lm = [m["loss"] for m in _metrics(sharded["run_dir"])]
    np.testing.assert_allclose(lm, ls, rtol=2e-5)
    assert ls[-1] < ls[0]


@pytest.mark.parametrize("over, exc, msg", [
    (["data.train_files=[/nonexistent/x.txt]"], DataError, "/nonexistent/x.txt: data file not found"),
    (["data.block_size=4096"], ConfigError, "block_size=4096 exceeds the model's max_position_embeddings=512"),
    (["model.overrides={vocab_size: 1000}"], ConfigError, "tokenizer has 32000 tokens but the model's vocab_size is 1000"),
    (["train.bogus=1"], ConfigError, "unknown key 'train.bogus'"),
])
def test_bad_input_stops_before_compute(tmp_path, data_dir, over, exc, msg):
    with pytest.raises(exc, match=msg.replace("[", r"\[").replace("]", r"\]")):
        pretrain.run_config(_cfg(*over), str(tmp_path / "r"))
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_bad_records(tmp_path, data_dir):
    f = tmp_path / "d.jsonl"
    f.write_text('{"content": "你好"}\n')
    with pytest.raises(DataError, match=r"d.jsonl: record 0 has no field 'text'"):
        pretrain.run_config(_cfg(f"data.train_files=[{f}]"), str(tmp_path / "r"))
    e = tmp_path / "empty.txt"
    e.write_text("")
    with pytest.raises(DataError, match="empty.txt: data file is empty"):
        pretrain.run_config(_cfg(f"data.train_files=[{e}]"), str(tmp_path / "r2"))

"""Loader throughput vs what a training step consumes, on the bench config ("bench-cpu": hidden 512, 8 layers,
batch 4 x 512, the pretraining stage's own task over token shards of the zh corpus).

Loader: `task.train.batch(s)` (MixtureBatches over memory-mapped shards) for random steps up to 10**6, in rows/s
and tokens/s; step: the jitted training step `train()` runs, fed by that loader.  Also the loader alone at
LLaMA-2-7B pretraining shapes (block 4096, 8 rows per host) for the TPU arithmetic in docs/data.md.

    LLAMA_JAX_DATA=... python scripts/bench/data_loader.py [--steps 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data_corpus import DATA  # noqa: E402


def loader_rate(batches, n=200, seed=0):
    rng = np.random.default_rng(seed)
    steps = rng.integers(0, 10**6, n)
    t = time.perf_counter()
    rows = 0
    for s in steps:
        rows += len(batches.batch(int(s))["tokens"])
    dt = time.perf_counter() - t
    return rows / dt, dt / n


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from llama_jax.sharding import host_batch_to_global
    from llama_jax.stages.pretrain import PretrainConfig, build_task
    from llama_jax.train.config import load_config
    from llama_jax.train.loop import build_train_step
    from llama_jax.train.run import build_mesh, build_model, build_tokenizer
    from llama_jax.data.shards import MixtureBatches, PackedView

    work = Path(tempfile.mkdtemp())
    cfg = load_config(PretrainConfig, None, [
        "model.init=bench-cpu", f"tokenizer={DATA}/llama2-tokenizer/tokenizer.model", "data.block_size=512",
        f"data.cache_dir={work}", "train.batch_size=4", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1",
        "train.progress=false"])
    cfg = cfg.replace(data=cfg.data.replace(train_files=[f"{DATA}/zh-corpus/clue_corpus_small_sample.txt",
                                                          f"{DATA}/zh-corpus/cmrc2018_wiki_paragraphs.txt"]))
    mesh = build_mesh(cfg)
    tok = build_tokenizer(cfg)
    model = build_model(cfg, mesh, vocab_size=len(tok))
    task = build_task(cfg, tok, model, work)
    rows_s, per_batch = loader_rate(task.train)
    ts, params, frozen = build_train_step(task.loss_fn, model, cfg.train, mesh)
    state, frozen = ts.init_state(params), ts.place_frozen(frozen)
    state, m = ts.step(state, frozen, host_batch_to_global(task.train.batch(0), mesh, ts.accum))
    float(m["loss"])  # compiled
    t = time.perf_counter()
    for s in range(1, a.steps + 1):
        state, m = ts.step(state, frozen, host_batch_to_global(task.train.batch(s), mesh, ts.accum))
        float(m["loss"])
    step_s = (time.perf_counter() - t) / a.steps
    # 7B-pretraining shapes: one host's 8 rows of 4096 tokens per step
    view = task.train.views[0]
    big = MixtureBatches([(PackedView(view.s, 4096, view.bos, view.eos), 1.0)], 8, 0)
    big_rows_s, big_per_batch = loader_rate(big)
    res = {"config": "bench-cpu, batch 4 x 512, fp32, 2 cores (contended)",
           "loader_batch_s": round(per_batch, 5), "loader_rows_per_s": round(rows_s, 1),
           "loader_tokens_per_s": round(rows_s * 512), "train_step_s": round(step_s, 3),
           "step_rows_per_s": round(4 / step_s, 2), "ratio_loader_vs_step": round(step_s / per_batch, 1),
           "loader_4096x8_batch_s": round(big_per_batch, 5), "loader_4096_tokens_per_s": round(big_rows_s * 4096)}
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Pretraining throughput through the real loop: `llama-jax pretrain`'s step vs transformers + torch AdamW,
and LoRA vs full step time on the same model.

Config: the foundation benchmark preset "bench-cpu" (hidden 512, 8 layers, vocab 32000), batch 4 x 512
tokens, fp32, packed blocks of the real Chinese corpus ($LLAMA_JAX_DATA/zh-corpus, LLaMA-2 tokenizer).

llama_jax contenders run the pretraining stage's own pieces: `stages.pretrain.build_task` (the
tokenised, packed, step-indexed batches and the segment-aware loss) and `train.loop.build_train_step`
(the jitted step `train()` runs: gradient accumulation scan, clipping, AdamW, NaN guard, donation),
each step fed `task.train.batch(step)` through the loop's host->device path.  Only the progress
bar, metrics file and checkpoints of `train()` are left out (they are per-log, not per-step).

  loop-full          full fine-tuning (all parameters train)
  loop-lora          LoRA r=8 on q,k,v,o,gate,up,down, base frozen (no optimizer state for it)
  loop-lora-embed    as loop-lora + embed_tokens and lm_head trained in full (the Chinese-LLaMA-2 recipe)

Peer: transformers LlamaForCausalLM (sdpa) + torch.optim.AdamW on the same token batches, same
initial weights, labels = input ids (HF's mean over the predicted positions).

    .venv/bin/python scripts/bench/pretrain_loop.py [--variants loop-full,loop-lora] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

PRESET, BATCH, SEQ = "bench-cpu", 4, 512
LORA = {"enabled": True, "rank": 8, "alpha": 16, "dropout": 0.0}
VARIANTS = {
    "loop-full": ({"enabled": False}, "full fine-tuning"),
    "loop-lora": (LORA, "LoRA r=8 on the 7 projections, base frozen"),
    "loop-lora-embed": ({**LORA, "trainable_modules": ["embed_tokens", "lm_head"]},
                        "LoRA r=8 + embed_tokens/lm_head in full"),
}
DEFAULT_VARIANTS = "loop-full,loop-lora,loop-lora-embed"


def data_dir() -> str:
    return os.environ.get("LLAMA_JAX_DATA", str(common.REPO.parent / "shared" / "data"))


def stage_config(ckpt: str, lora: dict, cache: str):
    from llama_jax.stages.pretrain import PretrainConfig
    from llama_jax.train.config import load_config

    d = data_dir()
    cfg = load_config(PretrainConfig, None, [
        f"model.init={ckpt}", f"tokenizer={d}/llama2-tokenizer/tokenizer.model",
        f"data.block_size={SEQ}", f"data.cache_dir={cache}", f"train.batch_size={BATCH}", "train.lr=1e-4",
        "train.warmup_ratio=0", "train.schedule=constant", "train.weight_decay=0.01", "train.b2=0.999",
        "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
    return cfg.replace(data=cfg.data.replace(train_files=[f"{d}/zh-corpus/clue_corpus_small_sample.txt"]),
                       lora=cfg.lora.replace(**lora))


def _loop_setup(spec):
    import jax

    from llama_jax.sharding import host_batch_to_global
    from llama_jax.stages.pretrain import build_task
    from llama_jax.train.loop import build_train_step
    from llama_jax.train.run import build_mesh, build_model, build_tokenizer, trainable_filter
    from llama_jax.train.optim import count_params

    cfg = stage_config(spec["ckpt"], spec["lora"], spec["cache"])
    mesh = build_mesh(cfg)
    tok = build_tokenizer(cfg)
    model = build_model(cfg, mesh, vocab_size=len(tok))
    task = build_task(cfg, tok, model, spec["run_dir"])
    trainable = trainable_filter(cfg, model)
    ts, params, frozen = build_train_step(task.loss_fn, model, cfg.train, mesh, trainable)
    n_train = count_params(params)
    st = {"state": ts.init_state(params), "i": 0}
    frozen = ts.place_frozen(frozen)
    del model, params
    t0 = time.perf_counter()
    first = host_batch_to_global(task.train.batch(0), mesh, ts.accum)
    ts.step.lower(st["state"], frozen, first).compile()
    compile_s = time.perf_counter() - t0

    def step():
        batch = host_batch_to_global(task.train.batch(st["i"]), mesh, ts.accum)
        st["state"], m = ts.step(st["state"], frozen, batch)
        st["i"] += 1
        loss = float(m["loss"])  # waits for the step
        return {"loss": loss}

    warm = [step()["loss"] for _ in range(spec["warmup"])]
    return step, {"compile_s": compile_s, "trainable_params": n_train, "warmup_losses": warm,
                  "jax": jax.__version__}


def _hf_setup(spec):
    import numpy as np
    import torch
    import transformers

    from llama_jax.stages.pretrain import build_task
    from llama_jax.train.run import build_tokenizer

    cfg = stage_config(spec["ckpt"], {"enabled": False}, spec["cache"])
    tok = build_tokenizer(cfg)

    class _Shape:  # build_task only reads the model's config
        config = __import__("llama_jax").preset(PRESET)

    task = build_task(cfg, tok, _Shape(), spec["run_dir"])
    model = transformers.LlamaForCausalLM.from_pretrained(spec["ckpt"], dtype=torch.float32,
                                                          attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    st = {"i": 0}

    def step():
        ids = torch.from_numpy(np.asarray(task.train.batch(st["i"])["tokens"])).long()
        st["i"] += 1
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": float(out.loss.detach())}

    warm = [step()["loss"] for _ in range(spec["warmup"])]
    return step, {"warmup_losses": warm, "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "transformers": transformers.__version__}


def _ckpt_setup(spec):
    import llama_jax

    cfg = llama_jax.preset(PRESET)
    llama_jax.save_hf(llama_jax.init_model(cfg, seed=0), spec["path"])
    return (lambda: None), {"params": cfg.num_params()}


def run(variants, rounds, warmup, budget_s, quiet_wait_s, log=print) -> dict:
    t_start = time.time()
    tmp = tempfile.mkdtemp(prefix="bench_pretrain_")
    ckpt, cache = os.path.join(tmp, "ckpt"), os.path.join(tmp, "cache")
    foreign_before = common.foreign_load_now(1.0)
    workers, ready = [], {}
    try:
        w = common.Worker("ckpt", __file__, {"kind": "ckpt", "path": ckpt}, log=log)
        w.wait_ready()
        w.close()
        base = {"ckpt": ckpt, "cache": cache, "warmup": warmup}
        # the HF worker tokenises first (fills the shared cache), then the llama_jax workers start
        workers.append(common.Worker("hf", __file__, {**base, "kind": "hf", "run_dir": os.path.join(tmp, "hf")},
                                     log=log))
        ready["hf"] = workers[0].wait_ready()
        for name in variants:
            workers.append(common.Worker(name, __file__, {**base, "kind": "loop", "lora": VARIANTS[name][0],
                                                          "run_dir": os.path.join(tmp, name)}, log=log))
            ready[name] = workers[-1].wait_ready()  # one at a time: each holds the model + optimizer
            log(f"[bench] {name} ready: {json.dumps(ready[name])}")
        r = common.interleave(workers, rounds, per_round=1, log=log, deadline=t_start + budget_s,
                              quiet_wait_s=quiet_wait_s)
    finally:
        for w in workers:
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)

    rows = {}
    for name in ["hf"] + variants:
        used, contended = common.quiet_samples(r[name])
        step_s = common.med([common.med(r[name][i]["times"]) for i in used])
        row = {"step_s_median": step_s, "tokens_per_s": BATCH * SEQ / step_s, "samples_used": used,
               "samples_done": len(r[name]), "contended": contended,
               "foreign_cores_median": common.med([r[name][i]["foreign_cores"] for i in used]),
               "ready": ready[name], "description": VARIANTS[name][1] if name in VARIANTS else
               "transformers LlamaForCausalLM (sdpa) + torch.optim.AdamW + clip_grad_norm_"}
        if name != "hf":
            pr, pc = common.paired_quiet(r["hf"], r[name])
            row["speedup_vs_hf"] = common.paired_ratio([common.med(r["hf"][i]["times"]) for i in pr],
                                                       [common.med(r[name][i]["times"]) for i in pr])
            row["speedup_contended"] = pc
        rows[name] = row
    if "loop-full" in rows:
        for name in variants:
            if name != "loop-full":
                pr, _ = common.paired_quiet(r["loop-full"], r[name])
                # step time of the variant / step time of full fine-tuning, paired per round
                rows[name]["time_vs_full"] = 1.0 / common.paired_ratio(
                    [common.med(r["loop-full"][i]["times"]) for i in pr], [common.med(r[name][i]["times"]) for i in pr])
    return {"config": {"preset": PRESET, "batch": BATCH, "seq": SEQ, "dtype": "float32"}, "results": rows,
            "foreign_load_before_cores": foreign_before, "quiet_threshold_cores": common.QUIET_CORES,
            "machine": common.machine_info(), "raw": r, "wall_s": time.time() - t_start}


def table(out) -> str:
    hdr = ["contender", "step s (median)", "tokens/s", "vs HF (paired)", "step time vs loop-full",
           "trainable params", "compile s", "samples used", "foreign load (cores)"]
    rows = []
    for name, r in out["results"].items():
        rows.append([f"{name}: {r['description']}", common.fmt(r["step_s_median"], 2), common.fmt(r["tokens_per_s"], 0),
                     (common.fmt(r["speedup_vs_hf"], 2) + "x" + (" (contended)" if r["speedup_contended"] else ""))
                     if "speedup_vs_hf" in r else "1",
                     common.fmt(r.get("time_vs_full"), 2) + "x" if "time_vs_full" in r else "-",
                     f"{r['ready'].get('trainable_params', 0):,}" if name != "hf" else "all",
                     common.fmt(r["ready"].get("compile_s"), 1) if name != "hf" else "-",
                     f"{len(r['samples_used'])}/{r['samples_done']}" + (" (contended)" if r["contended"] else ""),
                     common.fmt(r["foreign_cores_median"], 2)])
    return common.markdown_table(hdr, rows) + f"\n\nwall {out['wall_s']:.0f}s"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=600.0)
    ap.add_argument("--quiet-wait", type=float, default=30.0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out = run([v for v in args.variants.split(",") if v], args.rounds, args.warmup, args.budget_s, args.quiet_wait)
    print(table(out))
    common.write_json(args.json, out)


if __name__ == "__main__":
    if common.is_worker():
        spec = json.loads(sys.argv[sys.argv.index("--worker") + 1])
        common.worker_main({"ckpt": _ckpt_setup, "hf": _hf_setup, "loop": _loop_setup}[spec["kind"]])
    else:
        main()

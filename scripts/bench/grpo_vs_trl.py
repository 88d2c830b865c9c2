"""GRPO iteration time: llama_jax's GRPO stage vs TRL's GRPOTrainer, side by side.

    python3 -m venv .venv-trl && .venv-trl/bin/pip install torch==2.13.0 transformers==5.24.0 trl
    .venv/bin/python scripts/bench/grpo_vs_trl.py [--rounds 4] [--per-round 2] [--json out.json]
    .venv/bin/python scripts/bench/grpo_vs_trl.py --rounds 0 --cache-repeats 2   # first iteration, XLA cache

Same work on both sides: the PPO benchmark's tiny Llama (`ppo_vs_trl.MODEL`: vocab 4096, hidden
128, 2 layers, fp32) as policy and (a copy / LoRA-off view) reference, full fine-tuning, 8 prompts
of 32 tokens x G = 8 samples = 64 completions of 32 tokens at T = 1.0 (top-k / top-p off), a
reward function of the completion ids (`mean_id_reward`: mean token id / vocab, so groups are never
all equal), group-mean advantages scaled by the group std, k3 KL loss term beta = 0.04, clip 0.2,
token-level aggregation (TRL loss_type "dapo"), one optimizer step per iteration (TRL:
per_device_train_batch_size = 64, steps_per_generation = 1, num_iterations = 1), AdamW lr 1e-6.

Timing: one sample = one iteration (rollout + update).  llama_jax: the stage's `rollout_time_s`
(sampling, the experience pass, rewards, advantages) and `update_time_s`.  TRL: its `train()` loop
runs in a thread gated per optimizer step by a callback (as the PPO benchmark does); rollout time =
`_generate_and_score_completions` (generation, old / reference log-probs, rewards, advantages),
the rest of the step is the update.  The first iteration (llama_jax: XLA compilation included) is
reported separately.  Contenders run in their own processes, interleaved round by round.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
from ppo_vs_trl import MODEL, TRL_PYTHON, _ckpt_setup, _pin, _rss_mib, _worker  # noqa: E402

PROMPTS, G, P, N = 8, 8, 32, 32
TEMPERATURE, BETA, LR = 1.0, 0.04, 1e-6
BOS = 1


def prompts():
    import random

    rng = random.Random(0)
    return [[BOS] + [rng.randrange(3, MODEL["vocab_size"]) for _ in range(P - 1)] for _ in range(PROMPTS)]


def mean_id_reward(prompt_ids, response_ids, mask):
    """llama_jax reward function: mean response token id (EOS and padding excluded by the mask) / vocab."""
    import numpy as np

    r, m = np.asarray(response_ids, np.float64), np.asarray(mask, np.float64)
    return (np.sum(r * m, -1) / np.maximum(m.sum(-1), 1.0) / MODEL["vocab_size"]).astype(np.float32)


# ----------------------------------------------------------------------------- llama_jax worker
def _jax_setup(spec):
    cpus = _pin(spec["threads"])
    if spec.get("xla_cache"):  # as the CLI does (llama_jax.cli.enable_xla_cache), in a given directory
        os.environ["LLAMA_JAX_XLA_CACHE"] = spec["xla_cache"]
        from llama_jax.cli import enable_xla_cache

        enable_xla_cache()
    import jax

    from llama_jax.stages import grpo
    from llama_jax.train.config import load_config

    d = spec["dir"]
    cfg_path = os.path.join(d, "llama_jax_grpo.yaml")
    with open(cfg_path, "w") as f:
        json.dump({"model": {"init": os.path.join(d, "policy")}, "data": {"prompt_ids": prompts()},
                   "lora": {"enabled": False},
                   "grpo": {"reward_fn": "grpo_vs_trl:mean_id_reward", "group_size": G, "max_new_tokens": N,
                            "temperature": TEMPERATURE, "epochs": 1, "minibatches": 1, "clip_low": 0.2,
                            "clip_high": 0.2, "scale_rewards": True, "kl_coef": BETA, "kl_in": "loss",
                            "kl_estimator": "k3", "aggregation": "token", "missing_eos_score": None},
                   "train": {"batch_size": PROMPTS, "lr": LR, "schedule": "constant", "steps": 100000, "seed": 0,
                             "progress": False, "checkpoint_every": 0},
                   "mesh": {"data": 1, "fsdp": 1, "tensor": 1}}, f)
    cfg = load_config(grpo.GRPOConfig, cfg_path, [])
    tr, one, setup_s, rec, first_s, warm = common.timed_trainer(lambda: grpo.GRPOTrainer(cfg), spec["warmup"])

    def step():
        rec = one()
        return {"rollout_s": rec["rollout_time_s"], "update_s": rec["update_time_s"], "kl": rec["kl"],
                "score": rec["score"], "response_length": rec["response_length"]}

    return step, {"setup_s": setup_s, "first_iter_s": first_s, "first_rollout_s": rec["rollout_time_s"],
                  "first_update_s": rec["update_time_s"], "warmup_iter_s": [w["iter_time_s"] for w in warm],
                  "trainable_params": tr.n_policy_params, "rss_mib": _rss_mib(), "jax": jax.__version__, "cpus": cpus}


# ----------------------------------------------------------------------------- TRL worker (.venv-trl)
def _trl_setup(spec):
    cpus = _pin(spec["threads"])
    import warnings

    warnings.filterwarnings("ignore")
    import datasets
    import torch
    import transformers
    import trl
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    transformers.logging.set_verbosity_error()
    d, V = spec["dir"], MODEL["vocab_size"]
    words = Tokenizer(WordLevel({f"<{i}>": i for i in range(V)}, unk_token="<3>"))
    words.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<0>", bos_token="<1>", eos_token="<2>",
                                  padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(d, "policy"), dtype=torch.float32)
    ds = datasets.Dataset.from_dict({"prompt": [" ".join(f"<{i}>" for i in p) for p in prompts()] * 100000})

    def reward(prompts, completions, completion_ids=None, **kw):
        return [sum(c) / max(len(c), 1) / V for c in completion_ids]

    go, done = threading.Semaphore(0), threading.Semaphore(0)
    marks = {"start": 0.0, "rollout_s": None, "logs": {}}

    class Gate(TrainerCallback):
        def on_train_begin(self, *a, **k):
            go.acquire()
            marks["start"] = time.perf_counter()

        def on_log(self, a, s, c, logs=None, **k):
            marks["logs"] = dict(logs or {})

        def on_step_end(self, *a, **k):
            marks["end"] = time.perf_counter()
            done.release()
            go.acquire()
            marks["start"] = time.perf_counter()

    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl_grpo_"), per_device_train_batch_size=PROMPTS * G,
                      gradient_accumulation_steps=1, num_generations=G, steps_per_generation=1, num_iterations=1,
                      max_completion_length=N, temperature=TEMPERATURE, top_p=1.0, beta=BETA, epsilon=0.2,
                      loss_type="dapo", scale_rewards="group", learning_rate=LR, lr_scheduler_type="constant",
                      max_steps=100000, bf16=False, fp16=False, gradient_checkpointing=False, save_strategy="no",
                      report_to=[], logging_steps=1, disable_tqdm=True, seed=0, use_cpu=True,
                      dataloader_num_workers=0, shuffle_dataset=False)
    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Gate()])
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    setup_s = time.perf_counter() - t0
    orig = trainer._generate_and_score_completions

    def timed(*a, **k):
        t = time.perf_counter()
        out = orig(*a, **k)
        marks["rollout_s"] = time.perf_counter() - t
        return out

    trainer._generate_and_score_completions = timed
    err = []

    def train():
        try:
            trainer.train()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            err.append(repr(e))
            done.release()

    threading.Thread(target=train, daemon=True).start()

    def one():
        go.release()
        done.acquire()
        if err:
            raise RuntimeError(err[0])
        it = marks["end"] - marks["start"]
        return {"rollout_s": marks["rollout_s"], "update_s": it - marks["rollout_s"], "iter_s": it,
                "kl": marks["logs"].get("kl"), "score": marks["logs"].get("reward")}

    t0 = time.perf_counter()
    first = one()
    first_s = time.perf_counter() - t0
    warm = [one()["iter_s"] for _ in range(spec["warmup"])]
    return one, {"setup_s": setup_s, "first_iter_s": first_s, "first_rollout_s": first["rollout_s"],
                 "first_update_s": first["update_s"], "warmup_iter_s": warm,
                 "trainable_params": sum(p.numel() for p in policy.parameters() if p.requires_grad),
                 "threads": torch.get_num_threads(), "cpus": cpus, "rss_mib": _rss_mib(), "torch": torch.__version__,
                 "transformers": transformers.__version__, "trl": trl.__version__}


def _worker_setup(spec):
    return {"ckpt": _ckpt_setup, "jax": _jax_setup, "trl": _trl_setup}[spec["kind"]](spec)


def _grpo_worker(name, spec, python=None, log=print):
    old = common.PYTHON
    common.PYTHON = python or old
    try:
        return common.Worker(name, __file__, spec, log=log)
    finally:
        common.PYTHON = old


CONTENDERS = {"llama_jax": ("jax", 0), "trl": ("trl", 0), "llama_jax-1core": ("jax", 1), "trl-1core": ("trl", 1)}


def run(contenders=("llama_jax", "trl"), rounds=4, per_round=2, warmup=1, log=print):
    if "trl" in " ".join(contenders) and not os.path.exists(TRL_PYTHON):
        raise SystemExit(f"{TRL_PYTHON} not found: create the TRL virtualenv first (see the module docstring)")
    d = tempfile.mkdtemp(prefix="bench_grpo_")
    load0 = os.getloadavg()
    workers, ready = [], {}
    try:
        w = _grpo_worker("ckpt", {"kind": "ckpt", "dir": d}, log=log)
        w.wait_ready()
        w.close()
        for name in contenders:
            kind, threads = CONTENDERS[name]
            workers.append(_grpo_worker(name, {"dir": d, "warmup": warmup, "kind": kind, "threads": threads},
                                        python=TRL_PYTHON if kind == "trl" else None, log=log))
        for w in workers:
            ready[w.name] = w.wait_ready()
            log(f"[bench] {w.name} ready: {json.dumps(ready[w.name])}")
        R = common.interleave(workers, rounds, per_round=per_round, log=log)
    finally:
        for w in workers:
            w.close()
        shutil.rmtree(d, ignore_errors=True)
    rows, summary = [], {}
    for name, res in R.items():
        it = common.med(common.sample_times(res))
        ro, up = common.med([r["rollout_s"] for r in res]), common.med([r["update_s"] for r in res])
        fc = common.med([r["foreign_cores"] for r in res])
        summary[name] = {"iter_s": it, "rollout_s": ro, "update_s": up, "foreign_cores": fc, **ready[name]}
        rows.append([name, common.fmt(it, 3), common.fmt(ro, 3), common.fmt(up, 3),
                     common.fmt(ready[name]["first_iter_s"], 1), common.fmt(fc, 2)])
    out = {"summary": summary, "rounds": R, "loadavg_before": load0, "loadavg_after": os.getloadavg(),
           "shape": {"prompts": PROMPTS, "G": G, "prompt_len": P, "new_tokens": N}}
    if "llama_jax" in R and "trl" in R:
        out["trl_over_llama_jax"] = common.paired_ratio(common.sample_times(R["trl"]), common.sample_times(R["llama_jax"]))
    log(common.markdown_table(["contender", "iteration s", "rollout s", "update s", "first iteration s (compile)",
                               "foreign load (cores)"], rows))
    if "trl_over_llama_jax" in out:
        log(f"TRL / llama_jax per iteration (paired median): {out['trl_over_llama_jax']:.2f}x")
    return out


def first_iteration_cache(repeats: int = 2, log=print) -> dict:
    """First-iteration time (XLA compilation included) of fresh llama_jax processes, without and with
    the CLI's persistent XLA cache: `repeats` processes of each, alternating, the cached ones sharing
    one initially empty cache directory (the first of them fills it, the others load from it)."""
    d = tempfile.mkdtemp(prefix="bench_grpo_cache_")
    res = {"no_cache": [], "cache": []}
    try:
        w = _grpo_worker("ckpt", {"kind": "ckpt", "dir": d}, log=log)
        w.wait_ready()
        w.close()
        for i in range(repeats):
            for mode in ("no_cache", "cache"):
                spec = {"dir": d, "warmup": 1, "kind": "jax", "threads": 0,
                        "xla_cache": os.path.join(d, "xla") if mode == "cache" else None}
                w = _grpo_worker(f"llama_jax-{mode}", spec, log=log)
                r = w.wait_ready()
                w.close()
                res[mode].append({k: r[k] for k in ("first_iter_s", "first_rollout_s", "first_update_s", "setup_s")})
                log(f"[bench] {mode} process {i + 1}: first iteration {r['first_iter_s']:.1f} s "
                    f"(rollout {r['first_rollout_s']:.1f} + update {r['first_update_s']:.1f})")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contenders", default="llama_jax,trl")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-round", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cache-repeats", type=int, default=0,
                    help="also time the first iteration of N fresh processes without / with the persistent XLA cache")
    a = ap.parse_args(argv)
    out = run(tuple(a.contenders.split(",")), a.rounds, a.per_round, a.warmup) if a.rounds else {}
    if a.cache_repeats:
        out["first_iteration_cache"] = first_iteration_cache(a.cache_repeats)
    common.write_json(a.json, out)


if __name__ == "__main__":
    if common.is_worker():
        common.worker_main(_worker_setup)
    else:
        main()

"""PPO iteration time: llama_jax's PPO stage vs TRL's PPOTrainer, side by side.

The peer: TRL removed its PPO trainer in 1.13 (1.13-1.16 ship none); the latest release that has
one is 1.12.0, as `trl.experimental.ppo.PPOTrainer` (the classic "N+ implementation details"
PPOTrainer moved to experimental).  It runs in its own virtualenv, beside transformers and torch
at the versions of `.venv`:

    python3 -m venv .venv-trl
    .venv-trl/bin/pip install torch==2.13.0 transformers==5.24.0 trl==1.12.0
    .venv/bin/python scripts/bench/ppo_vs_trl.py [--contenders ...] [--rounds 6] [--per-round 2] [--json out.json]

Both sides get the same work: the same tiny Llama (`MODEL` below, fp32) as policy (and, as a copy,
the reference), a separate score model of the same shape as reward model *and* as the critic's
initialisation (a second copy that trains), full fine-tuning, the same 16 prompts of 32 tokens (no
padding), 32 sampled response tokens at T = 0.7 (top-k/top-p off, EOS = 2 stops a row; a random
policy over 4096 tokens almost never samples it, so both decode all 32 steps), k1 KL, β = 0.05,
GAE γ = 1, λ = 0.95, whitened advantages, clipped policy and value losses, AdamW lr 1e-5, and
`--epochs` × `--minibatches` updates per iteration (default 1 × 2).  Neither side runs evaluation,
sample generation, checkpointing or progress bars.

TRL settings that differ from its defaults so the work is the same: bf16=False (fp32 like llama_jax
on CPU), gradient_checkpointing=False (llama_jax's remat is off), num_sample_generations=0,
save_strategy="no", report_to=[], progress/printer callbacks removed.  Batch layout:
per_device_train_batch_size=16, gradient_accumulation_steps=1, num_mini_batches=M (TRL's
documented way to get M optimizer steps per epoch on one device).  Differences left as they are
(each side as shipped): TRL takes the rollout log-probs from `generate`'s scores while llama_jax
recomputes them teacher-forced (one more forward pass, in exchange for ratio = 1 exactly); TRL
has one AdamW over policy + critic, llama_jax two; TRL subtracts `missing_eos_penalty` (1.0) from
the score where llama_jax replaces it by `missing_eos_score` (−1): same cost.

Timing.  One sample = one PPO iteration (rollout + update).  TRL's `train()` runs its whole loop
in one call, so the TRL worker runs it in a thread gated by a callback: each "run" releases exactly
one iteration (the gate sits in `on_train_begin` / `on_step_end`), and the wall time from release
to the next `on_step_end` is the iteration.  Rollout time: from the iteration's start to the first
forward of the update (TRL: the first `forward()` on its PolicyAndValueWrapper; llama_jax: the
stage's own `rollout_time_s`, which ends after the advantages are ready).  Rollout tokens/s =
B × N sampled tokens / rollout time.  The first iteration of each side (llama_jax: includes XLA
compilation of the rollout, scoring, advantage and update programs) is reported separately, then
`--warmup` more untimed iterations; each contender runs in its own process, interleaved round by
round (ABBA), and every sample records the foreign CPU load (other users of this shared machine;
scripts/bench/common.py).  Ratios are medians of per-round ratios over rounds where both samples
were quiet (< 0.3 foreign cores), else over all rounds (flagged "contended").

Contenders (`--contenders`): `llama_jax` and `trl` as each sets itself up (XLA's thread pool and
torch's 2 OpenMP threads over both cores), and `llama_jax-1core` / `trl-1core`, each process pinned
to one core (sched_setaffinity before any thread pool exists; torch.set_num_threads(1)).  On this
2-core machine shared with other jobs, torch's 2-thread OpenMP loops slow down by an order of
magnitude whenever another process holds a core (a thread waits at every barrier for a
descheduled sibling), so the 1-core TRL run is the fair peer under load; the report gives every
TRL / llama_jax pair and the fastest-vs-fastest ratio.

    .venv/bin/python scripts/bench/ppo_vs_trl.py --contenders llama_jax,llama_jax-1core,trl,trl-1core \\
        --rounds 6 --per-round 2 --json out.json
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

REPO = common.REPO
TRL_PYTHON = str(REPO / ".venv-trl" / "bin" / "python")
MODEL = dict(vocab_size=4096, hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
B, P, N = 16, 32, 32
TEMPERATURE, KL_COEF, LR = 0.7, 0.05, 1e-5
PAD, BOS, EOS = 0, 1, 2


def prompts():
    import random

    rng = random.Random(0)
    return [[BOS] + [rng.randrange(3, MODEL["vocab_size"]) for _ in range(P - 1)] for _ in range(B)]


def _pin(threads: int) -> list[int]:
    """threads > 0: restrict this process to its first `threads` allowed cores (before any thread
    pool exists, so XLA's and torch's pools are sized to them); 0: leave it as it is."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads:
        cpus = cpus[:threads]
        os.sched_setaffinity(0, set(cpus))
    return cpus


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- checkpoints (.venv)
def _ckpt_setup(spec):
    import llama_jax

    cfg = llama_jax.preset("toy", **MODEL)
    llama_jax.save_hf(llama_jax.init_model(cfg, seed=0), os.path.join(spec["dir"], "policy"))
    llama_jax.save_hf(llama_jax.init_model(cfg, seed=1, head="score"), os.path.join(spec["dir"], "rm"))
    return (lambda: None), {"params": cfg.num_params()}


# ----------------------------------------------------------------------------- llama_jax worker (.venv)
def _jax_setup(spec):
    cpus = _pin(spec["threads"])
    import jax

    from llama_jax.stages import ppo
    from llama_jax.train.config import load_config

    d = spec["dir"]
    cfg_path = os.path.join(d, "llama_jax_ppo.yaml")
    with open(cfg_path, "w") as f:  # JSON is YAML: the stage reads it like any config file
        json.dump({"model": {"init": os.path.join(d, "policy")},
                   "data": {"prompt_ids": prompts()},
                   "lora": {"enabled": False},
                   "ppo": {"reward_model": os.path.join(d, "rm"), "reward_offset": None,
                           "max_new_tokens": N, "temperature": TEMPERATURE, "epochs": spec["epochs"],
                           "minibatches": spec["minibatches"], "kl_coef": KL_COEF, "kl_estimator": "k1",
                           "missing_eos_score": -1.0},
                   "train": {"batch_size": B, "lr": LR, "schedule": "linear", "steps": 100000, "seed": 0,
                             "progress": False, "checkpoint_every": 0},
                   "mesh": {"data": 1, "fsdp": 1, "tensor": 1}}, f)
    cfg = load_config(ppo.PPOConfig, cfg_path, [])
    tr, one, setup_s, rec, first_s, warm = common.timed_trainer(lambda: ppo.PPOTrainer(cfg), spec["warmup"])
    sizes = {"policy": tr.n_policy_params, "critic": tr.n_critic_params}

    def step():
        rec = one()
        return {"rollout_s": rec["rollout_time_s"], "response_length": rec["response_length"],
                "kl": rec["kl"], "score": rec["score"], "ratio_maxdev_first": rec["ratio_maxdev_first"]}

    return step, {"setup_s": setup_s, "first_iter_s": first_s, "first_rollout_s": rec["rollout_time_s"],
                  "warmup_iter_s": [w["iter_time_s"] for w in warm], "trainable_params": sizes,
                  "first_kl": rec["kl"], "rss_mib": _rss_mib(), "jax": jax.__version__, "cpus": cpus,
                  "devices": [str(x) for x in jax.devices()]}


# ----------------------------------------------------------------------------- TRL worker (.venv-trl)
def trl_trainer(spec, iterations: int, callbacks=()):
    """TRL's experimental PPOTrainer on the benchmark's models and prompts, `iterations` PPO
    iterations long (used alone for profiling: `trl_trainer(...).train()`)."""
    import warnings

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    warnings.filterwarnings("ignore")
    import datasets
    import torch
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedTokenizerFast
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    transformers.logging.set_verbosity_error()
    d = spec["dir"]
    V = MODEL["vocab_size"]
    words = Tokenizer(WordLevel({f"<{i}>": i for i in range(V)}, unk_token="<3>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=words,
                                  pad_token="<0>", bos_token="<1>", eos_token="<2>", padding_side="left")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD, BOS, EOS)
    load = lambda cls, sub: cls.from_pretrained(os.path.join(d, sub), dtype=torch.float32)
    policy, ref = load(AutoModelForCausalLM, "policy"), load(AutoModelForCausalLM, "policy")
    value = load(AutoModelForSequenceClassification, "rm")
    rm = load(AutoModelForSequenceClassification, "rm")
    ds = datasets.Dataset.from_dict({"input_ids": prompts()})
    out_dir = tempfile.mkdtemp(prefix="trl_ppo_")
    args = PPOConfig(output_dir=out_dir, per_device_train_batch_size=B, gradient_accumulation_steps=1,
                     num_mini_batches=spec["minibatches"], num_ppo_epochs=spec["epochs"], response_length=N,
                     temperature=TEMPERATURE, stop_token="eos", missing_eos_penalty=1.0, kl_coef=KL_COEF,
                     kl_estimator="k1", learning_rate=LR, lr_scheduler_type="linear", total_episodes=B * iterations,
                     local_rollout_forward_batch_size=B, num_sample_generations=0, bf16=False, fp16=False,
                     gradient_checkpointing=False, save_strategy="no", report_to=[], logging_steps=1,
                     disable_tqdm=True, seed=0, use_cpu=True, dataloader_num_workers=0)
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                         train_dataset=ds, value_model=value, eval_dataset=ds, callbacks=list(callbacks))
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    return trainer


def _trl_setup(spec):
    cpus = _pin(spec["threads"])
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback
    from trl.experimental.ppo import ppo_trainer as ppo_mod

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    go, done = threading.Semaphore(0), threading.Semaphore(0)
    marks = {"start": 0.0, "rollout_end": None, "logs": {}}

    class Gate(TrainerCallback):
        def on_train_begin(self, *a, **k):
            go.acquire()
            marks["start"], marks["rollout_end"] = time.perf_counter(), None

        def on_log(self, a, s, c, logs=None, **k):
            marks["logs"] = dict(logs or {})

        def on_step_end(self, *a, **k):
            marks["end"] = time.perf_counter()
            done.release()
            go.acquire()
            marks["start"], marks["rollout_end"] = time.perf_counter(), None

    t0 = time.perf_counter()
    trainer = trl_trainer(spec, 100000, [Gate()])
    setup_s = time.perf_counter() - t0
    orig_forward = ppo_mod.forward

    def forward(model, *a, **k):  # the first forward on the policy+value wrapper = the update begins
        if marks["rollout_end"] is None and isinstance(model, ppo_mod.PolicyAndValueWrapper):
            marks["rollout_end"] = time.perf_counter()
        return orig_forward(model, *a, **k)

    ppo_mod.forward = forward
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
        lg = marks["logs"]
        return {"rollout_s": marks["rollout_end"] - marks["start"], "iter_s": marks["end"] - marks["start"],
                "kl": lg.get("objective/kl"), "score": lg.get("objective/scores"),
                "num_eos_tokens": lg.get("val/num_eos_tokens")}

    t0 = time.perf_counter()
    first = one()
    first_s = time.perf_counter() - t0
    warm = [one()["iter_s"] for _ in range(spec["warmup"])]
    count = lambda m: sum(p.numel() for p in m.parameters())
    return one, {"setup_s": setup_s, "first_iter_s": first_s, "first_rollout_s": first["rollout_s"],
                 "warmup_iter_s": warm, "first_kl": first["kl"],
                 "trainable_params": {"policy": count(trainer.policy_model), "critic": count(trainer.value_model)},
                 "threads": torch.get_num_threads(), "cpus": cpus, "rss_mib": _rss_mib(), "torch": torch.__version__,
                 "transformers": transformers.__version__, "trl": trl.__version__,
                 "trainer": "trl.experimental.ppo.PPOTrainer"}


def _worker_setup(spec):
    return {"ckpt": _ckpt_setup, "jax": _jax_setup, "trl": _trl_setup}[spec["kind"]](spec)


# ----------------------------------------------------------------------------- coordinator
def _worker(name, spec, python=None, log=print):
    """common.Worker, started with another interpreter (the TRL virtualenv) when `python` is given."""
    old = common.PYTHON
    common.PYTHON = python or old
    try:
        return common.Worker(name, __file__, spec, log=log)
    finally:
        common.PYTHON = old


CONTENDERS = {  # name -> (kind, threads); threads 0 = as the library sets itself up (all cores)
    "llama_jax": ("jax", 0), "llama_jax-1core": ("jax", 1), "trl": ("trl", 0), "trl-1core": ("trl", 1)}


def run(contenders=tuple(CONTENDERS), rounds=6, per_round=2, warmup=2, epochs=1, minibatches=2, quiet_wait_s=5.0,
        budget_s=1200.0, log=print):
    if not os.path.exists(TRL_PYTHON):
        raise SystemExit(f"{TRL_PYTHON} not found: create the TRL virtualenv first (see the module docstring)")
    t_start = time.time()
    d = tempfile.mkdtemp(prefix="bench_ppo_")
    foreign_before = common.foreign_load_now(1.0)
    workers, ready = [], {}
    try:
        w = _worker("ckpt", {"kind": "ckpt", "dir": d}, log=log)
        params = w.wait_ready()["params"]
        w.close()
        spec = {"dir": d, "warmup": warmup, "epochs": epochs, "minibatches": minibatches}
        for name in contenders:
            kind, threads = CONTENDERS[name]
            workers.append(_worker(name, {**spec, "kind": kind, "threads": threads},
                                   python=TRL_PYTHON if kind == "trl" else None, log=log))
        for w in workers:  # setups (load, compile, first + warm-up iterations) overlap; timing starts after
            ready[w.name] = w.wait_ready()
            log(f"[bench] {w.name} ready: {json.dumps(ready[w.name])}")
        R = common.interleave(workers, rounds, per_round=per_round, log=log,
                              deadline=t_start + budget_s, quiet_wait_s=quiet_wait_s)
    finally:
        for w in workers:
            w.close()
        shutil.rmtree(d, ignore_errors=True)

    rows = {}
    for name in R:
        res = R[name]
        used, contended = common.quiet_samples(res)
        it = common.med([common.med(res[i]["times"]) for i in used])
        ro = common.med([res[i]["rollout_s"] for i in used])  # the round's last repetition's rollout
        rows[name] = {"iter_s_median": it, "rollout_s_median": ro, "update_s_median": it - ro,
                      "rollout_tokens_per_s": B * N / ro, "iters_per_s": 1 / it,
                      "samples_used": used, "samples_done": len(res), "contended": contended,
                      "foreign_cores_median": common.med([res[i]["foreign_cores"] for i in used]),
                      "ready": ready[name]}

    def ratio(num, den):
        pr, pc = common.paired_quiet(R[num], R[den])
        it = {n: [common.med(R[n][i]["times"]) for i in pr] for n in (num, den)}
        ro = {n: [R[n][i]["rollout_s"] for i in pr] for n in (num, den)}
        up = {n: [a - b for a, b in zip(it[n], ro[n])] for n in (num, den)}
        return {"iteration": common.paired_ratio(it[num], it[den]), "rollout": common.paired_ratio(ro[num], ro[den]),
                "update": common.paired_ratio(up[num], up[den]), "rounds": pr, "contended": pc}

    trls = [n for n in R if CONTENDERS[n][0] == "trl"]
    jaxs = [n for n in R if CONTENDERS[n][0] == "jax"]
    ratios = {f"{t} / {j}": ratio(t, j) for t in trls for j in jaxs}
    best = None
    if trls and jaxs:
        bt = min(trls, key=lambda n: rows[n]["iter_s_median"])
        bj = min(jaxs, key=lambda n: rows[n]["iter_s_median"])
        best = {"trl": bt, "llama_jax": bj, **ratios[f"{bt} / {bj}"]}
    return {"setup": {"model": MODEL, "params": params, "batch": B, "prompt_len": P, "new_tokens": N,
                      "temperature": TEMPERATURE, "epochs": epochs, "minibatches": minibatches, "dtype": "float32",
                      "rounds": rounds, "per_round": per_round, "warmup": warmup, "contenders": list(contenders)},
            "results": rows, "ratios": ratios, "best_vs_best": best, "raw": R,
            "foreign_load_before_cores": foreign_before, "quiet_threshold_cores": common.QUIET_CORES,
            "machine": common.machine_info(), "wall_s": time.time() - t_start}


def table(out) -> str:
    hdr = ["contender", "iteration s", "rollout s", "update s", "rollout tokens/s", "first iteration s",
           "samples used", "foreign load (cores)"]
    rows = []
    for name, r in out["results"].items():
        rows.append([name, common.fmt(r["iter_s_median"], 3), common.fmt(r["rollout_s_median"], 3),
                     common.fmt(r["update_s_median"], 3), common.fmt(r["rollout_tokens_per_s"], 0),
                     common.fmt(r["ready"]["first_iter_s"], 2),
                     f"{len(r['samples_used'])}/{r['samples_done']}" + (" (contended)" if r["contended"] else ""),
                     common.fmt(r["foreign_cores_median"], 2)])
    s = common.markdown_table(hdr, rows) + "\n\nRatios (median of per-round ratios; > 1: llama_jax faster):\n"
    for k, x in out["ratios"].items():
        s += (f"- {k}: iteration {x['iteration']:.2f}x, rollout {x['rollout']:.2f}x, update {x['update']:.2f}x "
              f"(rounds {x['rounds']}{', contended' if x['contended'] else ''})\n")
    if out["best_vs_best"]:
        b = out["best_vs_best"]
        s += f"- fastest TRL ({b['trl']}) / fastest llama_jax ({b['llama_jax']}): iteration {b['iteration']:.2f}x\n"
    s += (f"\nWall {out['wall_s']:.0f}s; foreign load before start {out['foreign_load_before_cores']:.2f} cores.")
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma list from {', '.join(CONTENDERS)}")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=2, help="iterations per contender per round (median taken)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations after the first")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--minibatches", type=int, default=2)
    ap.add_argument("--quiet-wait", type=float, default=5.0,
                    help="before each timed sample wait up to N s for other processes to go idle")
    ap.add_argument("--budget-s", type=float, default=1200.0, help="stop adding rounds after this (min 2 rounds)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    out = run([c for c in args.contenders.split(",") if c], args.rounds, args.per_round, args.warmup, args.epochs,
              args.minibatches, args.quiet_wait, args.budget_s)
    print(table(out))
    common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    if common.is_worker():
        common.worker_main(_worker_setup)
    else:
        main()

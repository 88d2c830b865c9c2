"""Rerun one RL-side stage of a finished built-in demo with overrides, and score it held out.

    .venv/bin/python scripts/rl_rerun.py DEMO_DIR grpo NAME [key=value ...]
    .venv/bin/python scripts/rl_rerun.py DEMO_DIR ppo NAME ppo.reward_model=runs/x/rm-model ppo.temperature=0.4
    .venv/bin/python scripts/rl_rerun.py DEMO_DIR rm NAME --kinds '{"numeral": 0.5, "neighbour": 0.2, ...}' --pairs 25600 train.steps=800

Starts from DEMO_DIR's configs (OUT/configs/<stage>.yaml of `llama-jax demo --out DEMO_DIR`), so the
SFT model, tokenizer and data are the demo's.  grpo / ppo: greedy exact-match of the exported policy
on the demo's 256 held-out questions and on 256 of the RL prompts themselves (trained on: the gap
between the two is what docs/rl.md reports), rollout score first -> last and KL.  rm: training pairs
regenerated with the given corruption-kind weights, then held-out accuracy per kind.  One JSON line per
run is appended to OUT_ROOT/results.jsonl (default runs/rl-rerun).  This produced the tables of
docs/rl.md ("Measured: issue 15, round 2").
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import llama_jax
from llama_jax import demo
from llama_jax.export import export
from llama_jax.plots import read_metrics
from llama_jax.stages import grpo, ppo, reward
from llama_jax.synthetic import SyntheticTask
from llama_jax.text import load_tokenizer


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo_dir", type=Path)
    ap.add_argument("stage", choices=("grpo", "ppo", "rm"))
    ap.add_argument("name")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--out-root", type=Path, default=Path("runs/rl-rerun"))
    ap.add_argument("--kinds", default=json.dumps(demo.PAIR_KINDS), help="rm: corruption-kind weights (JSON)")
    ap.add_argument("--pairs", type=int, default=demo.Sizes().pref_pairs, help="rm: training pairs")
    a = ap.parse_args(argv)
    d, out = a.demo_dir.absolute(), (a.out_root / a.name).absolute()
    try:
        sizes = demo.finished_demo_sizes(d)
    except ValueError as e:
        ap.error(str(e))
    seed = sizes.seed
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tok = load_tokenizer(d / "tokenizer" / "merged")
    task = SyntheticTask()
    res: dict = {"name": a.name, "stage": a.stage, "overrides": a.overrides}
    t0 = time.perf_counter()
    if a.stage == "rm":
        rng = random.Random(f"pairs:train:{seed}")
        kinds = json.loads(a.kinds)
        recs = []
        for e in task.examples(a.pairs, "train", seed + 2):
            bad, kind = task.corrupt(e, rng, kinds)
            recs.append({"prompt": e.question, "chosen": e.answer, "rejected": bad, "corruption": kind})
        pf = out / "pairs.jsonl"
        pf.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
        reward.run(d / "configs" / "rm.yaml", out=str(out / "run"), overrides=[f"data.train_files=[{pf}]", *a.overrides])
        res["seconds"] = round(time.perf_counter() - t0, 1)
        reward.export(out / "run", out / "model")
        acc = demo.pair_accuracy_by_kind(llama_jax.load(out / "model", head="score"), tok, d / "data" / "pref_test.jsonl")
        res.update(kinds=kinds, pairs=a.pairs, accuracy_by_kind={k: v["accuracy"] for k, v in acc.items()})
    else:
        {"grpo": grpo, "ppo": ppo}[a.stage].run(d / "configs" / f"{a.stage}.yaml", out=str(out / "run"),
                                                overrides=a.overrides)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        export(out / "run", out / "model")
        m = llama_jax.load(out / "model")
        res["exact_match_held_out"], _ = demo.exact_match(m, tok, demo.held_out_questions(task, sizes))
        # the demo's RL prompts are task.examples(n, "train", seed + 4): these 256 were trained on
        res["exact_match_rl_prompts"], _ = demo.exact_match(m, tok, task.examples(256, "train", seed + 4))
        recs = read_metrics(out / "run")
        sc = [r["score"] for r in recs if "score" in r]
        res.update(score_first=sc[0], score_last=sc[-1], kl_last=[r["kl"] for r in recs if "kl" in r][-1])
    print(json.dumps(res, ensure_ascii=False))
    with open(a.out_root / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(res, ensure_ascii=False) + "\n")
    return res


if __name__ == "__main__":
    main()

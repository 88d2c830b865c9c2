"""Does more SFT fix what GRPO fixes?  SFT for N steps on a finished built-in demo's own SFT data (from
its pretrained model, its sft.yaml), then optionally GRPO (its grpo.yaml) from that model; held-out
greedy exact-match, split by whether the answer has a colloquial form (`synthetic.colloquial`), and
the share of those questions answered colloquially (the habit the SFT data teach).

    .venv/bin/python scripts/sft_control.py DEMO_DIR --sft-steps 100,200,400 [--grpo-steps 16] [--out runs/sft-control]

One JSON line per SFT length in OUT/results.jsonl; docs/rl.md (round 4) has the table.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import llama_jax
from llama_jax import demo
from llama_jax.export import export
from llama_jax.plots import read_metrics
from llama_jax.stages import grpo, sft
from llama_jax.synthetic import SyntheticTask
from llama_jax.text import load_tokenizer


def score(model_dir, tok, questions) -> dict:
    em, replies = demo.exact_match(llama_jax.load(model_dir), tok, questions)
    c = demo.colloquial_share(questions, replies)
    return {"exact_match": round(em, 4), "colloquial_questions": c["questions"],
            "colloquial": c["colloquial"], "exact_match_colloquial_questions": c["exact_match"]}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo_dir", type=Path)
    ap.add_argument("--sft-steps", default="100,200,400")
    ap.add_argument("--grpo-steps", type=int, default=0, help="GRPO iterations after each SFT (0: none)")
    ap.add_argument("--out", type=Path, default=Path("runs/sft-control"))
    a = ap.parse_args(argv)
    d = a.demo_dir.absolute()
    try:
        sizes = demo.finished_demo_sizes(d)
        steps = [int(x) for x in a.sft_steps.split(",")]
    except ValueError as e:
        ap.error(str(e))
    if any(n < 1 for n in steps) or a.grpo_steps < 0:
        ap.error(f"--sft-steps {a.sft_steps} / --grpo-steps {a.grpo_steps}: step counts must be positive")
    seed = sizes.seed
    tok = load_tokenizer(d / "tokenizer" / "merged")
    questions = demo.held_out_questions(SyntheticTask(), sizes)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in steps:
        out = (a.out / f"sft{n}").absolute()
        shutil.rmtree(out, ignore_errors=True)
        sft.run(d / "configs" / "sft.yaml", out=str(out / "sft_run"),
                overrides=[f"train.steps={n}", f"train.checkpoint_every={n}", f"train.eval_every={max(1, n // 3)}"])
        export(out / "sft_run", out / "sft_model")
        row = {"demo": str(d), "seed": seed, "sft_steps": n, "sft": score(out / "sft_model", tok, questions)}
        if a.grpo_steps:
            grpo.run(d / "configs" / "grpo.yaml", out=str(out / "grpo_run"),
                     overrides=[f"model.init={out / 'sft_model'}", f"train.steps={a.grpo_steps}",
                                f"train.checkpoint_every={a.grpo_steps}"])
            export(out / "grpo_run", out / "grpo_model")
            row["grpo_steps"] = a.grpo_steps
            row["grpo"] = score(out / "grpo_model", tok, questions)
            sc = [r["score"] for r in read_metrics(out / "grpo_run") if "score" in r]
            row["grpo_rollout_score"] = [round(sc[0], 4), round(sc[-1], 4)]
        print(json.dumps(row, ensure_ascii=False), flush=True)
        with open(a.out / "results.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()

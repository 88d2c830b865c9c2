"""The demo over several seeds: `llama-jax demo --seed S` for each seed, then one table of the
held-out exact-match of SFT, PPO (against the reward model) and GRPO (checker), the RM's score of
the greedy answers and KL, read from each run's report.json (`stages`).

    .venv/bin/python scripts/demo_seeds.py [--seeds 0,1,2] [--out runs/demo-seeds] [--table-only]

Writes OUT/results.json and prints a markdown table (docs/demo.md and docs/rl.md show it).  Runs
that already have a complete report.json are not rerun (--rerun to force).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

STAGES = ("sft", "ppo", "grpo")


def _row(seed, rep):
    st = rep["stages"]
    cells = [str(seed)]
    for k in STAGES:
        s = st.get(k, {})
        em = s.get("exact_match")
        cells.append("-" if em is None else f"{100 * em:.1f}%")
    for k in STAGES:
        cells.append("-" if st.get(k, {}).get("rm_score") is None else f"{st[k]['rm_score']:.2f}")
    for k in ("ppo", "grpo"):
        cells.append("-" if st.get(k, {}).get("kl") is None else f"{st[k]['kl']:.3f}")
    h = st.get("ppo", {}).get("hacking_signal") or {}
    cells.append("yes" if h.get("hacking") else ("no" if h else "-"))
    rm = st.get("rm", {}).get("eval_accuracy_by_corruption") or {}
    cells.append(" ".join(f"{k[:4]} {100 * v['accuracy']:.0f}" for k, v in rm.items()) or "-")
    o = st.get("rm", {}).get("on_sft_samples") or {}
    k = o.get("k", 8)
    cells.append("-" if not o else f"{100 * o['pairwise_accuracy']:.1f}% / {100 * o[f'best_of_{k}_rm']:.1f}% / "
                                   f"{100 * o[f'pass_at_{k}']:.1f}%")
    col = [(st.get(k, {}).get("colloquial_questions") or {}).get("colloquial") for k in STAGES]
    cells.append("-" if col[0] is None else " / ".join("-" if c is None else f"{100 * c:.0f}%" for c in col))
    cells.append(f"{rep.get('seconds', 0):.0f}")
    return cells


def table(reports: dict) -> str:
    head = ["seed", "SFT EM", "PPO (RM) EM", "GRPO EM", "RM score SFT", "RM score PPO", "RM score GRPO", "KL PPO",
            "KL GRPO", "hacking", "RM held-out acc. per kind",
            "RM on SFT samples: right>wrong / best-of-8 / pass@8", "colloquial answers SFT / PPO / GRPO", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for seed, rep in reports.items():
        lines.append("| " + " | ".join(_row(seed, rep)) + " |")
    if len(reports) > 1:
        def mean(k):
            v = [r["stages"].get(k, {}).get("exact_match") for r in reports.values()]
            v = [x for x in v if x is not None]
            return f"{100 * sum(v) / len(v):.1f}%" if v else "-"
        lines.append("| mean | " + " | ".join(mean(k) for k in STAGES) + " |" + " |" * (len(head) - 4))
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/demo-seeds")
    ap.add_argument("--rerun", action="store_true")
    ap.add_argument("--table-only", action="store_true", help="only read the existing report.json files")
    a = ap.parse_args(argv)
    out = Path(a.out)
    reports = {}
    for seed in [int(s) for s in a.seeds.split(",")]:
        d = out / f"seed{seed}"
        rep_path = d / "report.json"
        done = rep_path.exists() and "grpo" in json.loads(rep_path.read_text()).get("stages", {})
        if not a.table_only and (a.rerun or not done):
            subprocess.run([sys.executable, "-m", "llama_jax.cli", "demo", "--out", str(d), "--seed", str(seed)],
                           check=True)
        if rep_path.exists():
            reports[seed] = json.loads(rep_path.read_text())
    t = table(reports)
    print(t)
    res = {"seeds": {str(k): v["stages"] for k, v in reports.items()}, "table": t}
    if reports:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n")
    return res


if __name__ == "__main__":
    main()

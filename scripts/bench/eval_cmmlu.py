"""`llama-jax eval` vs lm-eval's `hf` backend on the same CMMLU questions (SmolLM2-135M-Instruct).

The same N questions (the first `--per-subject` of each of the first `--subjects` CMMLU subjects,
test split), zero-shot and 5-shot, scored by
  - llama_jax: `llama_jax.stages.evaluate.run_eval` (one forward pass per question; float32, and
    bfloat16 for the rate), and
  - lm-eval 0.4.13 `simple_evaluate(model="hf", ...)` (device cpu, float32) on the local task
    YAMLs (`cmmlu_local_<subject>`, same prompts), with the same batch size,
in one process, interleaved per setting (ours, then hf, for 0-shot; then for 5-shot), so both see
the same background load.  Reported: questions/s (wall time of the scoring call, model already
loaded; ours in float32 includes XLA compilation in the first pass and is timed warm in a
second; bfloat16 one pass, compilation included), the hf/ours time ratio, and whether the predictions agree question for question.

    PYTHONPATH=. LLAMA_JAX_DATA=../shared/data python scripts/bench/eval_cmmlu.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--per-subject", type=int, default=10)
    ap.add_argument("--shots", default="0,5")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import lm_eval
    import numpy as np
    from lm_eval.tasks import TaskManager

    import llama_jax
    from llama_jax.cli import default_data_dir
    from llama_jax.data.multiple_choice import CMMLU_SUBJECTS
    from llama_jax.lm_eval_adapter import write_local_tasks
    from llama_jax.stages.evaluate import EvalConfig, run_eval
    from llama_jax.text import load_tokenizer
    from real_models import smollm2_hf_dir

    model_dir = smollm2_hf_dir()
    subjects = sorted(CMMLU_SUBJECTS)[:a.subjects]
    n = a.subjects * a.per_subject
    tasks_dir = write_local_tasks(Path(os.environ.get("TMPDIR", "/tmp")) / "llama_jax_bench_tasks", default_data_dir())
    tm = TaskManager(include_path=str(tasks_dir))
    names = [f"cmmlu_local_{s}" for s in subjects]
    models = {"float32": llama_jax.load(model_dir)}
    if not a.no_bf16:
        models["bfloat16"] = llama_jax.load(model_dir, dtype="bfloat16")
    tok = load_tokenizer(model_dir)
    from lm_eval.models.huggingface import HFLM

    t0 = time.perf_counter()
    hf = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=a.batch_size)
    hf_load = time.perf_counter() - t0
    rows = []
    for shots in [int(s) for s in a.shots.split(",")]:
        cfg = EvalConfig(model=str(model_dir), tasks=["cmmlu"], subjects=subjects, limit=a.per_subject, shots=shots,
                         batch_size=a.batch_size, progress=False)
        res = {}
        for dtype, m in models.items():
            for attempt in (("cold", "warm") if dtype == "float32" else ("cold",)):
                t0 = time.perf_counter()
                r = run_eval(cfg, model=m, tok=tok)["tasks"]["cmmlu"]
                res[(dtype, attempt)] = (time.perf_counter() - t0, r)
        t0 = time.perf_counter()
        ref = lm_eval.simple_evaluate(model=hf, tasks=names, num_fewshot=shots, limit=a.per_subject,
                                      task_manager=tm, log_samples=True)
        t_hf = time.perf_counter() - t0
        ref_preds = {s: [int(np.argmax([x[0] for x in smp["filtered_resps"]]))
                         for smp in sorted(ref["samples"][f"cmmlu_local_{s}"], key=lambda d: d["doc_id"])]
                     for s in subjects}
        ours32 = res[("float32", "warm")][1]
        agree = sum(p == q for s in subjects for p, q in zip(ours32["subjects"][s]["predictions"], ref_preds[s]))
        row = {"shots": shots, "questions": n, "hf_seconds": t_hf, "hf_qps": n / t_hf,
               "hf_acc": float(np.mean([ref["results"][f"cmmlu_local_{s}"]["acc,none"] for s in subjects])),
               "predictions_agree": agree, "load_avg_1m": os.getloadavg()[0]}
        for (dtype, attempt), (secs, r) in res.items():  # bf16: one pass, compile included
            row[f"ours_{dtype}_{attempt}_seconds"] = secs
            row[f"ours_{dtype}_{attempt}_qps"] = n / secs
            row[f"ratio_{dtype}_{attempt}"] = t_hf / secs
            row[f"ours_{dtype}_acc_macro"] = r["acc_macro"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nCMMLU, {n} questions ({a.subjects} subjects x {a.per_subject}), SmolLM2-135M-Instruct, batch {a.batch_size}, "
          f"contended (load avg {os.getloadavg()[0]:.1f}); hf model load {hf_load:.1f} s (not timed)")
    print("| shots | lm-eval hf q/s | llama_jax fp32 q/s (cold / warm) | ratio (cold / warm) | bf16 q/s (cold) "
          "| agree | acc hf / ours |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        bf = f"{r['ours_bfloat16_cold_qps']:.2f}" if "ours_bfloat16_cold_qps" in r else "-"
        print(f"| {r['shots']} | {r['hf_qps']:.2f} | {r['ours_float32_cold_qps']:.2f} / {r['ours_float32_warm_qps']:.2f} | "
              f"{r['ratio_float32_cold']:.2f}x / {r['ratio_float32_warm']:.2f}x | {bf} | {r['predictions_agree']}/{n} | "
              f"{r['hf_acc']:.3f} / {r['ours_float32_acc_macro']:.3f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`llama-jax data clean` throughput (records/s, near-dup stage included) on the shared sharegpt file
(1,000 multi-turn records) and on an N-times replicated copy of it.

    LLAMA_JAX_DATA=... python scripts/bench/data_clean.py --replicate 100 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data_corpus import DATA  # noqa: E402


def main():
    from llama_jax.data.clean import CleanConfig, clean

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--replicate", type=int, default=100)
    ap.add_argument("--work", default="/tmp/llama_jax_bench_clean")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = DATA / "zh-sft" / "sharegpt_zh_1K_format.jsonl"
    rep = work / f"sharegpt_x{a.replicate}.jsonl"
    data = src.read_bytes()
    with open(rep, "wb") as f:
        for _ in range(a.replicate):
            f.write(data if data.endswith(b"\n") else data + b"\n")
    res = {}
    for name, path in (("x1", src), (f"x{a.replicate}", rep)):
        t, c = time.perf_counter(), time.process_time()
        r = clean([str(path)], work / f"out_{name}", CleanConfig(progress=False, lang="zh"))
        dt, cpu = time.perf_counter() - t, time.process_time() - c
        res[name] = {"records": r["records_in"], "kept": r["records_out"], "seconds": round(dt, 2),
                     "records_per_s": round(r["records_in"] / dt, 1),
                     "cpu_seconds": round(cpu, 2), "records_per_cpu_s": round(r["records_in"] / cpu, 1), "mb_per_s": round(path.stat().st_size / 2**20 / dt, 2),
                     "removed": {k: v for k, v in r["removed"].items() if v}}
        print(json.dumps({name: res[name]}), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

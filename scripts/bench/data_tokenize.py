"""Tokenisation throughput (MB of text per second): `tokenize_corpus` with 1 and 2 processes versus a plain
single-process sentencepiece loop (read lines, encode in batches of 1,000, keep nothing) over the same file.
Contenders are interleaved round by round (see common.py) and paired ratios reported.

    LLAMA_JAX_DATA=... python scripts/bench/data_tokenize.py --mb 64 --rounds 2 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data_corpus import DATA, make_corpus  # noqa: E402


def cpu_s() -> float:
    """CPU seconds of this process and its finished children (the spawned tokeniser workers)."""
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def sp_loop(path, tok):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tok)
    batch, n = [], 0
    with open(path, "rb") as f:
        for raw in f:
            batch.append(raw.rstrip(b"\r\n").decode("utf-8"))
            if len(batch) >= 1000:
                n += sum(map(len, sp.encode(batch)))
                batch = []
    n += sum(map(len, sp.encode(batch)))
    return n


def main():
    from llama_jax.data.shards import TokenizeConfig, tokenize_corpus

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=float, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chunk-mb", type=float, default=16)
    ap.add_argument("--work", default="/tmp/llama_jax_bench_tok")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    nbytes = make_corpus(work / "corpus.txt", a.mb)
    mb = nbytes / 2**20
    tok = str(DATA / "llama2-tokenizer" / "tokenizer.model")
    res: dict = {"mb": round(mb, 1), "rounds": [], "load_avg": []}
    for r in range(a.rounds):
        row = {}
        t, c = time.perf_counter(), cpu_s()
        ntok = sp_loop(work / "corpus.txt", tok)
        row["sp_loop"] = mb / (time.perf_counter() - t)
        row["sp_loop_cpu_s"] = cpu_s() - c
        for n in (1, 2):
            shutil.rmtree(work / "shards", ignore_errors=True)
            t, c = time.perf_counter(), cpu_s()
            m = tokenize_corpus([str(work / "corpus.txt")], tok, work / "shards",
                                TokenizeConfig(num_proc=n, chunk_mb=a.chunk_mb), progress=False)
            row[f"shards_{n}proc"] = mb / (time.perf_counter() - t)
            row[f"shards_{n}proc_cpu_s"] = cpu_s() - c
            assert m["counts"]["tokens"] == ntok, (m["counts"]["tokens"], ntok)
        res["rounds"].append({k: round(v, 3) for k, v in row.items()})
        res["load_avg"].append(os.getloadavg()[0])
        print(json.dumps(res["rounds"][-1]), flush=True)
    for k in ("sp_loop", "shards_1proc", "shards_2proc"):
        res[f"median_{k}_cpu_mb_s"] = round(statistics.median(mb / x[k + "_cpu_s"] for x in res["rounds"]), 3)
        res[f"median_{k}_mb_s"] = round(statistics.median(x[k] for x in res["rounds"]), 3)
    for k in ("shards_1proc", "shards_2proc"):
        res[f"ratio_{k}_vs_sp_loop"] = round(statistics.median(x[k] / x["sp_loop"] for x in res["rounds"]), 3)
    res["tokens"] = ntok
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

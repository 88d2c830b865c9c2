"""Scale check: a generated corpus of --mb MiB -> `llama-jax data tokenize --num-proc 2` -> `llama-jax pretrain`
for a few steps on the shards, each under /usr/bin/time -v, with the peak RSS of the whole process tree
(parent + tokeniser workers) sampled every 0.1 s.  Prints one JSON object; --json writes it.

    LLAMA_JAX_DATA=/path/to/shared/data python scripts/bench/data_scale.py --mb 3072 --work /tmp/scale
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_corpus import make_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run cmd under /usr/bin/time -v; peak summed RSS of its process tree, wall time, max RSS per time -v."""
    import psutil

    p = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, cwd=REPO)
    peak = [0]

    def sample():
        root = psutil.Process(p.pid)
        while p.poll() is None:
            try:
                tot = sum(q.memory_info().rss for q in [root, *root.children(recursive=True)])
                peak[0] = max(peak[0], tot)
            except psutil.Error:
                pass
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    t.start()
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    t.join()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    return {"rc": p.returncode, "wall_s": round(wall, 1), "tree_peak_rss_mb": round(peak[0] / 2**20, 1),
            "time_v_max_rss_mb": round(int(m.group(1)) / 1024, 1) if m else None, "stdout_tail": out[-600:],
            "stderr_tail": err[-1500:] if p.returncode else ""}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=float, default=3072)
    ap.add_argument("--work", default="/tmp/llama_jax_scale")
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--keep", action="store_true", help="keep the corpus and shards")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    nbytes = make_corpus(work / "corpus.txt", a.mb)
    res = {"mb": round(nbytes / 2**20, 1), "make_corpus_s": round(time.perf_counter() - t, 1)}
    tok = str(Path(os.environ.get("LLAMA_JAX_DATA", REPO.parent / "shared" / "data")) / "llama2-tokenizer" / "tokenizer.model")
    res["tokenize"] = run_measured([sys.executable, "-m", "llama_jax.cli", "data", "tokenize", "--tokenizer", tok,
                                    "--input", str(work / "corpus.txt"), "--out", str(work / "shards"),
                                    "--num-proc", str(a.num_proc), "--no-progress"], env)
    res["tokenize"]["mb_per_s"] = round(res["mb"] / res["tokenize"]["wall_s"], 2)
    if res["tokenize"]["rc"] == 0:
        m = json.loads((work / "shards" / "manifest.json").read_text())
        res["tokens"], res["docs"], res["shards"] = m["counts"]["tokens"], m["counts"]["docs"], len(m["shards"])
        res["pretrain"] = run_measured([sys.executable, "-m", "llama_jax.cli", "pretrain",
                                        str(REPO / "configs" / "toy" / "pretrain.yaml"), "--out", str(work / "run"),
                                        f"data.shards={work / 'shards'}", f"train.steps={a.steps}", "train.log_every=1",
                                        "train.eval_every=0", "train.checkpoint_every=0", "train.progress=false"], env)
        ms = [json.loads(l) for l in open(work / "run" / "metrics.jsonl")] if res["pretrain"]["rc"] == 0 else []
        res["losses"] = [m["loss"] for m in ms if "loss" in m]
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""SFT throughput: packing vs length buckets vs naive padding, through the real `llama-jax sft` loop.

Same model, data (zh-sft), max_length and batch size; each variant runs the shared training loop
for a few steps and we read its per-step wall time from metrics.jsonl (first logged interval,
which includes compilation, is dropped).  Useful tokens/s = non-padding tokens per batch / step time.

    .venv/bin/python scripts/bench/sft_batching.py [--steps 12] [--model toy|bench-cpu] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from llama_jax.stages import sft
    from llama_jax.train.config import load_config

    rows = []
    for batching in ("pad", "bucket", "pack"):
        cfg = load_config(sft.SFTConfig, REPO / "configs/toy/sft.yaml", [
            f"model.init={a.model}", f"data.batching={batching}", f"data.max_length={a.max_length}",
            "data.train_files=[$DATA/zh-sft/alpaca_zh_demo.json, $DATA/zh-sft/belle_open_source_1k.jsonl, "
            "$DATA/zh-sft/oaast_sft_zh.json, $DATA/zh-sft/sharegpt_zh_1K_format.jsonl]",
            f"train.steps={a.steps}", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0",
            f"train.batch_size={a.batch}", "train.progress=false", "mesh.fsdp=1", "data.sample_prompts=[]"])
        with tempfile.TemporaryDirectory() as d:
            sft.run_config(cfg, d)
            ms = [json.loads(l) for l in open(Path(d) / "metrics.jsonl")]
            # skip the first 2 steps (compilation; bucketing compiles once per distinct length)
            times = [m["step_time"] for m in ms[2:]]
        rows.append({"batching": batching, "step_time_s": statistics.median(times), "steps_timed": len(times)})
        print(rows[-1], flush=True)
    # useful tokens per batch, from the data itself
    from llama_jax.data.sft_examples import bucket_batches, load_sft, pack_examples, padding_fraction
    from llama_jax.text import load_tokenizer
    from llama_jax.cli import default_data_dir

    data = default_data_dir()
    tok = load_tokenizer(data / "llama2-tokenizer" / "tokenizer.model")
    files = [str(data / "zh-sft" / f) for f in ("alpaca_zh_demo.json", "belle_open_source_1k.jsonl",
                                                 "oaast_sft_zh.json", "sharegpt_zh_1K_format.jsonl")]
    ex, _ = load_sft(files, tok, "chinese-alpaca-2", a.max_length)
    real_total = sum(len(e) for e in ex)
    n_batches = {"pad": len(ex) // a.batch, "bucket": len(ex) // a.batch,
                 "pack": len(pack_examples(ex, a.max_length)["tokens"]) / a.batch}
    pad_frac = {"pad": 1 - real_total / (len(ex) * a.max_length),
                "bucket": padding_fraction(bucket_batches(ex, a.batch, 0)),
                "pack": padding_fraction(pack_examples(ex, a.max_length))}
    base = None
    print(f"\n| batching | padding share | step time (s) | useful tokens/s | vs naive |\n|---|---|---|---|---|")
    for r in rows:
        b = r["batching"]
        useful = real_total / n_batches[b] / r["step_time_s"]
        base = base or useful
        r.update(padding_share=pad_frac[b], useful_tokens_per_sec=useful, speedup=useful / base)
        print(f"| {b} | {pad_frac[b]:.1%} | {r['step_time_s']:.3f} | {useful:.0f} | {useful / base:.2f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark: tokenizer training time and merged-tokenizer encode throughput.

    .venv/bin/python scripts/bench/tokenizer_encode.py [--data DIR] [--min-seconds 2]

Trains a 20,000-piece BPE model on the two Simplified Chinese corpus files (all lines,
~3.5 MB, and the first 90% used for the merged tokenizer), merges it into LLaMA-2, then
encodes the held-out last 10% with the fast HF tokenizer (batch) and with sentencepiece.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llama_jax.tokenizer import MergeOptions, default_data_dir, merge_tokenizers, train_bpe  # noqa: E402
from llama_jax.tokenizer.corpus import read_lines, split_head_tail  # noqa: E402

ZH_FILES = ("zh-corpus/clue_corpus_small_sample.txt", "zh-corpus/cmrc2018_wiki_paragraphs.txt")
BASE = "llama2-tokenizer/tokenizer.model"


def best_rate(fn, min_seconds: float) -> float:
    """Seconds per call: the fastest of repeated calls over at least min_seconds."""
    fn()  # warm up (thread pools, caches)
    best, spent = float("inf"), 0.0
    while spent < min_seconds:
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=default_data_dir())
    parser.add_argument("--vocab-size", type=int, default=20000)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="time spent per encode measurement")
    args = parser.parse_args()
    if not args.data.is_dir():
        print(f"data directory {args.data} not found (set LLAMA_JAX_DATA)", file=sys.stderr)
        return 2

    import sentencepiece as spm
    from transformers import AutoTokenizer

    files = [args.data / name for name in ZH_FILES]
    train_lines, held_out = [], []
    for path in files:
        head, tail = split_head_tail(read_lines(path), 0.9)
        train_lines += head
        held_out += tail
    corpus_mb = sum(p.stat().st_size for p in files) / 1e6
    held_chars = sum(len(line) for line in held_out)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full = train_bpe(tmp / "zh_full", input_files=files, vocab_size=args.vocab_size)
        name = f"train {args.vocab_size} BPE pieces, all lines ({corpus_mb:.2f} MB)"
        rows.append((name, f"{full.seconds:.2f} s", "", ""))
        (tmp / "train90.txt").write_text("\n".join(train_lines) + "\n", encoding="utf-8")
        part = train_bpe(tmp / "zh90", input_files=[tmp / "train90.txt"], vocab_size=args.vocab_size)
        rows.append((f"train {args.vocab_size} BPE pieces, first 90% of lines", f"{part.seconds:.2f} s", "", ""))
        start = time.perf_counter()
        merged = merge_tokenizers(args.data / BASE, part.model_path, tmp / "merged",
                                  MergeOptions(pad_token=True, pad_to_multiple_of=64))
        rows.append((f"merge into LLaMA-2 + write HF files ({merged.vocab_size} pieces)",
                     f"{time.perf_counter() - start:.2f} s", "", ""))

        hf = AutoTokenizer.from_pretrained(str(tmp / "merged"))
        sp = spm.SentencePieceProcessor(model_file=str(tmp / "merged" / "tokenizer.model"))
        base_sp = spm.SentencePieceProcessor(model_file=str(args.data / BASE))
        encoders = {
            "merged, HF fast tokenizer, batch `tok(lines)`": lambda: hf(held_out)["input_ids"],
            "merged, HF `tokenizers` backend `encode_batch`": lambda: hf.backend_tokenizer.encode_batch(held_out),
            "merged, sentencepiece `encode(lines)` (batch, all threads)": lambda: sp.encode(held_out),
            "merged, sentencepiece one line at a time": lambda: [sp.encode(line) for line in held_out],
            "LLaMA-2 base, sentencepiece `encode(lines)`": lambda: base_sp.encode(held_out),
        }
        for name, fn in encoders.items():
            seconds = best_rate(fn, args.min_seconds)
            lines_per_s, chars_per_s = len(held_out) / seconds, held_chars / seconds
            rows.append((name, f"{seconds * 1000:.1f} ms", f"{lines_per_s:,.0f}", f"{chars_per_s:,.0f}"))

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Held-out text: {len(held_out)} lines, {held_chars:,} chars. Machine: {os.cpu_count()} CPU cores, "
          f"{platform.machine()}, Python {platform.python_version()}, load average {load}.")
    print()
    print("| step | time | lines/s | chars/s |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A generated text corpus of a given size from the shared corpora (for the data benchmarks and the
slow scale test): the zh-corpus paragraphs and en-corpus articles, one document per line, repeated
until the size is reached (written in ~8 MB blocks: memory stays flat whatever the size).

    python scripts/bench/data_corpus.py OUT.txt --mb 3072
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

DATA = Path(os.environ.get("LLAMA_JAX_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
SOURCES = ["zh-corpus/clue_corpus_small_sample.txt", "zh-corpus/cmrc2018_wiki_paragraphs.txt",
           "zh-corpus/drcd_wiki_paragraphs_zh_hant.txt", "en-corpus/wiki_demo.txt"]


def make_corpus(out: str | os.PathLike, mb: float) -> int:
    """Write `mb` MiB (rounded up to whole lines) to `out`; returns the bytes written."""
    block = b"".join(l for s in SOURCES for l in (DATA / s).read_bytes().splitlines(keepends=True)
                     if l.strip() and l.endswith(b"\n"))
    target, n = int(mb * (1 << 20)), 0
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        while n < target:
            chunk = block if target - n >= len(block) else block[: block.index(b"\n", target - n) + 1]
            f.write(chunk)
            n += len(chunk)
    os.replace(tmp, out)
    return n


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--mb", type=float, default=64)
    a = ap.parse_args()
    print(make_corpus(a.out, a.mb))

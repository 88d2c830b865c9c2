"""Token shards: streamed tokenisation (txt / jsonl / parquet, gz / zst), the packed view equals the
in-memory `pack`, bad UTF-8 and tokenizer mismatch, O(1) step-indexed mixtures, disjoint host rows,
and SIGKILL during tokenisation and training -> the same shards and bit-identical losses."""
import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from llama_jax.data.packing import pack
from llama_jax.data.shards import (MixtureBatches, PackedView, TokenizeConfig, TokenShards, permute,
                                   tokenize_corpus)
from llama_jax.data.sources import DataError
from llama_jax.text import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("corpus")
    zh = (data_dir / "zh-corpus" / "cmrc2018_wiki_paragraphs.txt").read_bytes()[:200_000]
    zh = zh[: zh.rindex(b"\n") + 1]
    (d / "zh.txt").write_bytes(zh)
    en = (data_dir / "en-corpus" / "c4_demo.jsonl").read_bytes().split(b"\n")[:60]
    (d / "en.jsonl.gz").write_bytes(gzip.compress(b"\n".join(en) + b"\n"))
    import zstandard

    zh2 = zh[:50_000][: zh[:50_000].rindex(b"\n") + 1]
    (d / "zh2.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(zh2))
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [json.loads(l)["text"] for l in en[:20]]
    pq.write_table(pa.table({"text": texts, "id": list(range(20))}), d / "en.parquet", row_group_size=7)
    return d


@pytest.fixture(scope="module")
def tok_path(data_dir):
    return str(data_dir / "llama2-tokenizer" / "tokenizer.model")


def test_shards_equal_in_memory_tokens_and_pack(corpus, tok_path, tmp_path):
    files = [str(corpus / n) for n in ("zh.txt", "en.jsonl.gz", "zh2.txt.zst", "en.parquet")]
    m = tokenize_corpus(files, tok_path, tmp_path / "s", TokenizeConfig(chunk_mb=0.05), progress=False)
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == 32000
    assert len(m["shards"]) > 6  # zh.txt is cut into several work units
    tok = load_tokenizer(tok_path)
    # reference: every document read whole and encoded in one process
    lines = lambda b: [l.decode() for l in b.split(b"\n") if l.strip()]
    en = [json.loads(l)["text"] for l in lines(gzip.decompress((corpus / "en.jsonl.gz").read_bytes()))]
    zh = (corpus / "zh.txt").read_bytes()
    texts = lines(zh) + en + lines(zh[:50_000][: zh[:50_000].rindex(b"\n") + 1]) + en[:20]
    ref = [np.asarray(tok.sp.encode(t), np.int32) for t in texts]
    s = TokenShards(tmp_path / "s", tok)
    assert s.num_docs == len(ref) == m["counts"]["docs"]
    docs = [s.tokens(int(s.doc_index[i]), int(s.doc_index[i + 1])) for i in range(s.num_docs)]
    assert all(np.array_equal(a, b) for a, b in zip(docs, ref))
    for T, (d0, d1) in [(64, (0, None)), (7, (5, 40)), (128, (100, s.num_docs))]:
        v = PackedView(s, T, 1, 2, d0, d1)
        p = pack(ref[d0:d1], T, 1, 2)
        got = v.rows(np.arange(len(v)))
        assert len(v) == len(p)
        for k in ("tokens", "segments", "positions"):
            np.testing.assert_array_equal(got[k], getattr(p, k))
    # the same command again is a no-op returning the manifest; 2 processes write the same bytes
    assert tokenize_corpus(files, tok_path, tmp_path / "s", TokenizeConfig(chunk_mb=0.05), progress=False) == m
    tokenize_corpus(files, tok_path, tmp_path / "s2", TokenizeConfig(chunk_mb=0.05, num_proc=2), progress=False)
    for f in sorted(os.listdir(tmp_path / "s" / "shards")):
        if not f.endswith(".json"):
            assert (tmp_path / "s" / "shards" / f).read_bytes() == (tmp_path / "s2" / "shards" / f).read_bytes(), f


def test_bad_utf8_and_tokenizer_mismatch(tmp_path, tok_path, data_dir):
    f = tmp_path / "bad.txt"
    f.write_bytes("第一行\n".encode() + b"ab\xffcd\n" + "第三行\n".encode())
    m = tokenize_corpus([str(f)], tok_path, tmp_path / "ok", progress=False)
    assert m["counts"]["docs"] == 2 and m["counts"]["bad_utf8_lines"] == 1
    off = len("第一行\n".encode()) + 2
    assert m["bad_utf8_examples"] == [f"{f}: byte {off}: invalid UTF-8 (invalid start byte)"]
    with pytest.raises(DataError, match=f"bad.txt: byte {off}: invalid UTF-8"):
        tokenize_corpus([str(f)], tok_path, tmp_path / "err", TokenizeConfig(on_bad_utf8="error"), progress=False)
    assert not (tmp_path / "err" / "manifest.json").exists()
    other = str(data_dir / "models" / "stories260K" / "tok512.model")
    with pytest.raises(DataError, match="written with tokenizer .*tokenizer.model .*use another output directory"):
        tokenize_corpus([str(f)], other, tmp_path / "ok", progress=False)
    with pytest.raises(DataError, match="shards were tokenised with .*re-tokenise with this tokenizer"):
        TokenShards(tmp_path / "ok", load_tokenizer(other))
    j = tmp_path / "x.jsonl"
    j.write_text('{"content": "你好"}\n')
    with pytest.raises(DataError, match="x.jsonl: record 0 has no field 'text'"):
        tokenize_corpus([str(j)], tok_path, tmp_path / "j", progress=False)


def test_step_batches_o1_mixture_and_hosts(corpus, tok_path, tmp_path):
    tokenize_corpus([str(corpus / "zh.txt")], tok_path, tmp_path / "zh", TokenizeConfig(chunk_mb=0.05), progress=False)
    tokenize_corpus([str(corpus / "en.jsonl.gz")], tok_path, tmp_path / "en", progress=False)
    zh, en = PackedView(TokenShards(tmp_path / "zh"), 32, 1, 2), PackedView(TokenShards(tmp_path / "en"), 32, 1, 2)
    # a keyed bijection of [0, n), different per key
    for n in (1, 2, 13, 1000, len(zh)):
        p = permute(np.arange(n), n, 7)
        assert sorted(p.tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2))
    G = 8
    mix = MixtureBatches([(zh, 0.8), (en, 0.2)], G, seed=3)
    # exact shares: after s steps source 0 has given floor(s*G*0.8) rows
    counts = np.zeros(2, int)
    for s in range(50):
        for k, _ in mix.plan(s):
            counts[k] += 1
    assert counts.tolist() == [320, 80]
    # each epoch of a source visits every row once
    one = MixtureBatches([(en, 1.0)], G, seed=3)
    seen = [r for s in range(len(en) // G) for _, r in one.plan(s)]
    assert len(set(seen)) == len(seen)
    # step s is a function of (seed, s): a fresh object agrees, and step 10**6 costs what step 10 does
    again = MixtureBatches([(zh, 0.8), (en, 0.2)], G, seed=3)
    for s in (0, 7, 10**6):
        b1, b2 = mix.batch(s), again.batch(s)
        assert all(np.array_equal(b1[k], b2[k]) for k in b1)
    t = time.perf_counter(); mix.batch(10); t10 = time.perf_counter() - t
    t = time.perf_counter(); mix.batch(10**6); t6 = time.perf_counter() - t
    assert t6 < 10 * t10 + 0.05, (t10, t6)
    # 2 processes (process_index 0 / 1 of 2), each in its own interpreter: disjoint rows whose union is
    # the 1-process batch, and each process reads (PackedView.rows) only its own rows
    code = ("import json, sys, numpy as np\n"
            "from llama_jax.data.shards import MixtureBatches, PackedView, TokenShards\n"
            "h = int(sys.argv[1]); read = []\n"
            "class V(PackedView):\n"
            "    def rows(self, rows):\n"
            "        read.extend((self.name, int(r)) for r in rows); return super().rows(rows)\n"
            f"zh = V(TokenShards({str(tmp_path / 'zh')!r}), 32, 1, 2); zh.name = 0\n"
            f"en = V(TokenShards({str(tmp_path / 'en')!r}), 32, 1, 2); en.name = 1\n"
            f"m = MixtureBatches([(zh, 0.8), (en, 0.2)], {G}, seed=3, host=h, num_hosts=2)\n"
            "b = m.batch(5)\n"
            "print(json.dumps({'read': read, 'tokens': b['tokens'].tolist()}))\n")
    outs = []
    for h in (0, 1):
        r = subprocess.run([sys.executable, "-c", code, str(h)], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "PYTHONPATH": REPO})
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(json.loads(r.stdout))
    r0, r1 = ({tuple(x) for x in o["read"]} for o in outs)
    assert len(r0) == len(r1) == G // 2 and not r0 & r1
    assert r0 | r1 == set(mix.plan(5))
    full = mix.batch(5)["tokens"]
    np.testing.assert_array_equal(np.concatenate([outs[0]["tokens"], outs[1]["tokens"]]), full)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "llama_jax.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO, **(env or {})}, timeout=900)


def test_sigkill_during_tokenisation_and_training(corpus, tok_path, tmp_path):
    """`llama-jax data tokenize` killed after 2 shards, rerun: the same shards as an uninterrupted run.
    `llama-jax pretrain` on a zh/en mixture, implicitly tokenising, killed in tokenisation and then in
    training, rerun: losses bit-identical to an uninterrupted run."""
    args = ["data", "tokenize", "--tokenizer", tok_path, "--input", str(corpus / "zh.txt"),
            str(corpus / "en.jsonl.gz"), "--chunk-mb", "0.03", "--no-progress"]
    ref = _cli(*args, "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    k = _cli(*args, "--out", str(tmp_path / "k"), env={"LLAMA_JAX_TEST_KILL_AFTER_SHARDS": "2"})
    assert k.returncode == -9 and not (tmp_path / "k" / "manifest.json").exists()
    assert len(list((tmp_path / "k" / "shards").glob("*.json"))) == 2
    again = _cli(*args, "--out", str(tmp_path / "k"), "--num-proc", "2")
    assert again.returncode == 0, again.stderr[-2000:]
    for f in sorted(os.listdir(tmp_path / "ref" / "shards")) + ["doc_index.npy"]:
        p = f if f == "doc_index.npy" else os.path.join("shards", f)
        if not f.endswith(".json"):
            assert (tmp_path / "ref" / p).read_bytes() == (tmp_path / "k" / p).read_bytes(), f

    cfg = os.path.join(REPO, "configs", "toy", "pretrain.yaml")
    mixture = json.dumps([{"files": [str(corpus / "zh.txt")], "weight": 0.75},
                          {"files": [str(corpus / "en.jsonl.gz")], "weight": 0.25}])
    common = ["pretrain", cfg, f"data.mixture={mixture}", "data.chunk_mb=0.03", "data.block_size=32",
              "train.batch_size=4", "train.steps=6", "train.log_every=1", "train.eval_every=3", "train.eval_batches=1",
              "train.checkpoint_every=2", "train.progress=false", "mesh.fsdp=1"]
    run = tmp_path / "run"
    k1 = _cli(*common, "--out", str(run), env={"LLAMA_JAX_TEST_KILL_AFTER_SHARDS": "1"})
    assert k1.returncode == -9, k1.stderr[-3000:]
    k2 = _cli(*common, "--out", str(run), env={"LLAMA_JAX_TEST_KILL_AT_STEP": "5"})
    assert k2.returncode == -9, k2.stderr[-3000:]
    timing = {"tokens_per_sec", "mfu", "step_time"}
    load = lambda d: [{a: b for a, b in json.loads(l).items() if a not in timing}
                      for l in open(d / "metrics.jsonl")]
    before = load(run)  # steps 1..5 as the uninterrupted run computed them (the reference)
    assert [m["step"] for m in before][-1] == 5
    k3 = _cli(*common, "--out", str(run))
    assert k3.returncode == 0, k3.stderr[-3000:]
    # the checkpoint of step 4 may have been torn by the kill (async save): then step 2's is used
    resumed = int(k3.stdout.split("resuming from checkpoint at step ")[1].split()[0])
    assert resumed in (2, 4)
    after = load(run)
    assert [m["step"] for m in after] == [1, 2, 3, 4, 5, 6]
    assert after[:5] == before  # steps resumed-6 recomputed bit for bit (JSON floats: exact reprs)

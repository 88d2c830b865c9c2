"""Named eval sets (data.eval_sets) in pretraining and SFT: loss / ppl / bits per char per set.

- pretraining with eval_sets {held: the same files as data.eval_files, en: English text}: the
  `held` set reproduces the stage's own eval loss and ppl exactly, and bits per char equals the
  loss x predicted tokens / characters / ln 2 counted independently here;
- SFT logs the same measures for its text sets (LM loss on packed text) next to its own eval.
"""
import json
import math
import os

import pytest

from llama_jax.stages import pretrain, sft
from llama_jax.train.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


@pytest.fixture(scope="module")
def texts(tmp_path_factory, data_dir):
    """Short documents (no document is cut by a 64-token row) in zh and en."""
    d = tmp_path_factory.mktemp("sets")
    zh = [l[:40] for l in (data_dir / "zh-corpus/cmrc2018_wiki_paragraphs.txt").read_text().splitlines()[:48]]
    en = [json.loads(l)["text"][:60] for l in (data_dir / "en-corpus/c4_demo.jsonl").read_text().splitlines()[:48]]
    (d / "zh.txt").write_text("\n".join(zh) + "\n")
    (d / "en.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in en))
    return d, zh, en


def test_pretrain_eval_sets(tmp_path, texts, data_dir):
    d, zh, en = texts
    cfg = load_config(pretrain.PretrainConfig, os.path.join(REPO, "configs/toy/pretrain.yaml"), [
        "data.block_size=64", "train.batch_size=8", "data.max_documents=200", "train.progress=false",
        "train.eval_batches=50", "train.steps=6", "train.log_every=3", "train.eval_every=3",
        "train.checkpoint_every=0", "mesh.fsdp=1", f"data.eval_files=[{d / 'zh.txt'}]",
        f"data.eval_sets={{held: [{d / 'zh.txt'}], en: [{d / 'en.jsonl'}]}}"])
    r = pretrain.run_config(cfg, str(tmp_path / "run"))
    evals = [m for m in _metrics(r["run_dir"]) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [3, 6]
    import jax.numpy as jnp
    import numpy as np

    from llama_jax.data.packing import pack
    from llama_jax.text import load_tokenizer

    tok = load_tokenizer(data_dir / "llama2-tokenizer/tokenizer.model")

    def packed(docs):
        b = pack([np.asarray(tok.sp.encode(t), np.int32) for t in docs], 64, tok.bos_token_id, tok.eos_token_id)
        nxt = np.concatenate([b.segments[:, 1:], np.zeros_like(b.segments[:, :1])], axis=1)
        return b, int(((nxt == b.segments) & (nxt > 0)).sum())

    for name, docs in (("held", zh), ("en", en)):
        b, predicted = packed(docs)
        for m in evals:
            assert m[f"eval_{name}_ppl"] == pytest.approx(math.exp(m[f"eval_{name}_loss"]), rel=1e-9)
            assert m[f"eval_{name}_bpc"] == pytest.approx(
                m[f"eval_{name}_loss"] * predicted / sum(map(len, docs)) / math.log(2), rel=1e-9)
        # the last eval = the final model's loss over every row of the set
        s, w = pretrain.lm_loss(r["model"], {"tokens": jnp.asarray(b.tokens), "segments": jnp.asarray(b.segments),
                                             "positions": jnp.asarray(b.positions)}, True)
        assert float(w) == predicted
        assert evals[-1][f"eval_{name}_loss"] == pytest.approx(float(s) / float(w), rel=1e-5)
    # the stage's own eval (data.eval_files: the same file, whole batches only) is still there
    assert abs(evals[-1]["eval_loss"] - evals[-1]["eval_held_loss"]) < 1e-2
    assert evals[-1]["eval_held_loss"] < evals[0]["eval_held_loss"]


def test_sft_eval_sets(tmp_path, texts):
    d, _, _ = texts
    cfg = load_config(sft.SFTConfig, os.path.join(REPO, "configs/toy/sft.yaml"), [
        "train.steps=2", "train.eval_every=2", "train.log_every=2", "train.checkpoint_every=0",
        "train.progress=false", "mesh.fsdp=1", "data.max_length=64", "train.eval_batches=1",
        "data.sample_prompts=[]", f"data.eval_sets={{zh: [{d / 'zh.txt'}], en: [{d / 'en.jsonl'}]}}"])
    r = sft.run_config(cfg, str(tmp_path / "run"))
    m = [m for m in _metrics(r["run_dir"]) if "eval_loss" in m][-1]
    for name in ("zh", "en"):
        assert math.isfinite(m[f"eval_{name}_loss"]) and m[f"eval_{name}_loss"] > 0
        assert m[f"eval_{name}_ppl"] == pytest.approx(math.exp(m[f"eval_{name}_loss"]))
        assert 0 < m[f"eval_{name}_bpc"] < 40

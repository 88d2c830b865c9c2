"""Reward-model stage: padding invariance, loss vs NumPy, learning (synthetic + real zh-pref),
HF-causal-LM init with LoRA, and HF LlamaForSequenceClassification export parity."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import llama_jax
from llama_jax.cli import main
from llama_jax.stages import reward
from llama_jax.train.config import ConfigError, load_config
from llama_jax.train.run import RunDir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "toy", "rm.yaml")
PAD = 32000
QUIET = ["train.progress=false", "mesh.fsdp=1"]


def _cfg(*over):
    return load_config(reward.RMConfig, CONFIG, QUIET + list(over))


def _tiny(seed=0):
    # hidden 64, 2 layers, a small vocab with a dedicated pad; score head at the RM init scale (scores ~ O(1))
    m = llama_jax.init_model(llama_jax.preset("toy", vocab_size=320, pad_token_id=300), seed=seed, head="score")
    reward.init_score_head(m, seed)
    return m


def _jit(fn, model):
    """fn(model, *arrays) compiled once per shape (eager calls of the scanned model are slow on CPU)."""
    g, st = nnx.split(model)
    f = jax.jit(lambda st, *a: fn(nnx.merge(g, st), *a))
    return lambda *a: jax.tree.map(np.asarray, f(st, *(jax.tree.map(jnp.asarray, x) for x in a)))


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def _pad(rows, T, left=False, pad=300):
    ids = np.full((len(rows), T), pad, np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


def test_left_and_right_padding_give_the_same_score():
    score = _jit(reward.last_token_scores, _tiny())
    rng = np.random.RandomState(0)
    rows = [np.r_[1, rng.randint(3, 300, 6), 2], np.r_[1, rng.randint(3, 300, 12), 2]]  # BOS ... EOS
    (ri, rm), (li, lm) = _pad(rows, 20), _pad(rows, 20, left=True)
    both = score(np.concatenate([ri, li]), np.concatenate([rm, lm]))  # one compiled shape
    right, left = both[:2], both[2:]
    alone = score(rows[1][None], np.ones((1, len(rows[1])), np.int32))  # the longer row, unpadded
    np.testing.assert_allclose(left, right, atol=1e-5)
    np.testing.assert_allclose(right[1], alone[0], atol=1e-5)
    assert abs(right[0] - right[1]) > 1e-3  # the rows really differ: the checks above are not vacuous


def _np_last(scores, mask):
    out = np.empty(len(mask))
    for i, m in enumerate(mask):
        out[i] = scores[i, max(j for j in range(len(m)) if m[j])]
    return out


def test_loss_and_metrics_match_numpy_reference():
    model = _tiny(seed=1)
    rng = np.random.RandomState(1)
    B = 5
    chosen = [np.r_[1, rng.randint(3, 300, rng.randint(3, 14)), 2] for _ in range(B)]
    rejected = [np.r_[1, rng.randint(3, 300, rng.randint(3, 14)), 2] for _ in range(B)]
    T = 16
    ci, cm = _pad(chosen, T)
    ri, rm = _pad(rejected, T)
    margin = np.array([0.0, 0.5, -0.3, 1.0, 0.2], np.float32)
    weight = np.array([1, 1, 1, 1, 0], np.float32)  # the last is a filler pair: must not count
    batch = {"chosen_ids": ci, "chosen_mask": cm, "rejected_ids": ri, "rejected_mask": rm,
             "margin": margin, "weight": weight}
    coef = 0.01
    s, w, aux = _jit(lambda m, b: reward.rm_loss(m, b, coef), model)(batch)

    # reference: the full per-token scores, the last real token found by a Python loop, float64 maths
    full = _jit(lambda m, ids, mask: m(ids, mask), model)
    full_c, full_r = np.float64(full(ci, cm)), np.float64(full(ri, rm))
    rc, rr = _np_last(full_c, cm), _np_last(full_r, rm)
    d = rc - rr
    per = np.log1p(np.exp(-(d - margin))) + coef * (rc + rr) ** 2
    keep = weight > 0
    assert float(w) == keep.sum()
    np.testing.assert_allclose(float(s) / float(w), per[keep].mean(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(float(aux["accuracy"]) / float(w), (d[keep] > 0).mean(), atol=1e-6)
    np.testing.assert_allclose(float(aux["margin"]) / float(w), d[keep].mean(), atol=1e-6)
    np.testing.assert_allclose(float(aux["chosen_score"]) / float(w), rc[keep].mean(), atol=1e-6)
    assert 0 < (d[keep] > 0).sum() < keep.sum()  # a mix of right and wrong orderings
    assert (d[keep] - margin[keep] > 0).sum() != (d[keep] > 0).sum()  # the margin changes the verdict somewhere


def test_collate_layout_and_pad_checks(data_dir, tmp_path):
    from llama_jax.data.preference import PairExample

    p = [PairExample(np.array([1, 5, 6], np.int32), np.array([7, 2], np.int32), np.array([8, 9, 9, 2], np.int32))]
    b = reward.collate(p, [0.5], [1.0], PAD, multiple=8)
    assert b["chosen_ids"].tolist() == [[1, 5, 6, 7, 2] + [PAD] * 3]
    assert b["rejected_ids"].tolist() == [[1, 5, 6, 8, 9, 9, 2, PAD]]
    assert b["chosen_mask"].sum() == 5 and b["rejected_mask"].sum() == 7
    # EOS as pad, and no pad at all, are refused before any compute
    with pytest.raises(ConfigError, match="is EOS"):
        reward.run_config(_cfg("data.pad_id=2", "model.overrides={vocab_size: 32064}"), str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="no PAD id"):
        reward.run_config(_cfg("data.pad_id=null", "model.overrides={vocab_size: 32064}"), str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="outside the model's vocab_size"):
        reward.run_config(_cfg("model.overrides={vocab_size: 32000}"), str(tmp_path / "c"))
    assert not (tmp_path / "a" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- learning
def _synthetic(path, n, seed):
    """Separable pairs: the chosen reply carries the marker 好评, the rejected one never does."""
    rng = np.random.RandomState(seed)
    pool = list("天地人日月山水火木金土风云雨雪花草鱼鸟马牛羊米面茶酒书画")
    txt = lambda k: "".join(rng.choice(pool, k))
    with open(path, "w") as f:
        for i in range(n):
            a, b = txt(rng.randint(6, 20)), txt(rng.randint(6, 20))
            cut = rng.randint(0, len(a) + 1)
            chosen = a[:cut] + "好评" + a[cut:]
            rec = {"conversations": [{"from": "human", "value": f"第{i}题：{txt(8)}"}], "chosen": chosen, "rejected": b}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("rm_syn")
    _synthetic(tmp / "syn.jsonl", 480, 0)
    run_dir = tmp / "run"
    over = [f"data.train_files=[{tmp / 'syn.jsonl'}]", "data.max_length=96", "data.pad_to_multiple=96",
            "data.eval_fraction=0.2", "train.batch_size=16", "train.lr=3e-3", "train.log_every=12",
            "train.eval_every=12", "train.checkpoint_every=0", "rm.norm_samples=64", *QUIET]
    assert main(["rm", CONFIG, "--out", str(run_dir), *over]) == 0  # through the CLI
    return tmp, run_dir


def test_synthetic_separable_preferences_are_learned(synthetic_run):
    _, run_dir = synthetic_run
    ms = _metrics(run_dir)
    ev = [m for m in ms if "eval_accuracy" in m]
    print("synthetic held-out accuracy by step:", [(m["step"], round(m["eval_accuracy"], 3)) for m in ev])
    assert ev[-1]["step"] == 24 and ev[-1]["eval_accuracy"] >= 0.9, ev[-1]  # one epoch
    assert ev[-1]["eval_margin"] > 0.5
    norm = json.loads((run_dir / "reward_norm.json").read_text())
    assert norm["count"] == 64 and norm["source"] == "train_chosen" and np.isfinite(norm["offset"])
    assert RunDir.read(run_dir)[1]["head"] == "score"  # the run says it is a score-head run (export rebuilds one)


def _hf_scores(hf_dir, rows):
    """transformers' scores of `rows`, right- then left-padded with PAD, in one batch."""
    hf = transformers.LlamaForSequenceClassification.from_pretrained(hf_dir).eval()
    assert hf.config.pad_token_id == PAD
    T = max(map(len, rows)) + 3
    (ri, rm), (li, lm) = _pad(rows, T, pad=PAD), _pad(rows, T, left=True, pad=PAD)
    ids, mask = np.concatenate([ri, li]), np.concatenate([rm, lm])
    with torch.no_grad():  # HF pools the rightmost token that is not pad_token_id
        return hf(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits[:, 0].numpy(), ids, mask


def test_export_matches_transformers_sequence_classification(synthetic_run, data_dir):
    tmp, run_dir = synthetic_run
    out = tmp / "hf"
    assert main(["export", "--model", str(run_dir), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    ours = llama_jax.load(out)  # the same weights, read back
    rng = np.random.RandomState(3)
    rows = [np.r_[1, rng.randint(3, 32000, 9), 2], np.r_[1, rng.randint(3, 32000, 17), 2]]
    ref, ids, mask = _hf_scores(out, rows)
    np.testing.assert_allclose(_jit(reward.last_token_scores, ours)(ids, mask), ref, atol=1e-4)
    # the normalisation offset travels as a config field (what reward.export adds after the export)
    reward.add_norm_to_export(out, reward.read_norm(run_dir))
    c = json.loads((out / "config.json").read_text())
    assert c["reward_offset"] == json.loads((run_dir / "reward_norm.json").read_text())["offset"]
    assert transformers.AutoConfig.from_pretrained(out).reward_offset == c["reward_offset"]


def test_lora_rm_from_hf_causal_lm(synthetic_run, data_dir, tmp_path):
    """HF causal LM init: lm_head dropped, score head fresh and trained with LoRA, base frozen; export works."""
    tmp, _ = synthetic_run
    base = llama_jax.init_model(llama_jax.preset("toy", vocab_size=32064), seed=3)
    llama_jax.save_hf(base, tmp_path / "base", tokenizer=str(data_dir / "llama2-tokenizer" / "tokenizer.model"))
    cfg = _cfg(f"model.init={tmp_path / 'base'}", "tokenizer=null", "model.overrides={}",
               f"data.train_files=[{tmp / 'syn.jsonl'}]", "data.max_length=96", "data.pad_to_multiple=96", "data.max_pairs=96",
               "train.steps=4", "train.batch_size=8", "train.lr=1e-2", "train.log_every=2", "train.eval_every=0",
               "train.checkpoint_every=4", "lora.enabled=true", "lora.rank=4", "lora.alpha=8", "rm.norm_samples=8")
    r = reward.run_config(cfg, str(tmp_path / "run"))
    trained = {tuple(map(str, k)): np.asarray(v.get_value())
               for k, v in nnx.to_flat_state(nnx.state(r["model"], nnx.Param))}
    src = {tuple(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(base, nnx.Param))}
    assert ("lm_head", "kernel") not in trained and ("score", "kernel") in trained
    for k, v in src.items():
        if k[0] != "lm_head":
            np.testing.assert_array_equal(trained[k], v, err_msg=str(k))  # backbone frozen, bit for bit
    init = llama_jax.load(tmp_path / "run" / "init_score")
    assert not np.array_equal(np.asarray(init.score.kernel.get_value()), trained[("score", "kernel")])
    assert np.std(np.asarray(init.score.kernel.get_value())) == pytest.approx(1 / np.sqrt(65), rel=0.25)
    assert any(np.abs(v).max() > 0 for k, v in trained.items() if k[-1] == "b" and "lora" in k)
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert "score" in stored["lora"]["trainable_modules"] and RunDir.read(tmp_path / "run")[1]["head"] == "score"
    # export merges LoRA into a LlamaForSequenceClassification that transformers scores the same
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    rows = [np.r_[1, np.arange(100, 111), 2], np.r_[1, np.arange(500, 505), 2]]
    ref, ids, mask = _hf_scores(tmp_path / "hf", rows)
    r["model"].eval()
    np.testing.assert_allclose(_jit(reward.last_token_scores, r["model"])(ids, mask), ref, atol=1e-4)


def test_real_zh_pref_heldout_accuracy(tmp_path, data_dir):
    """The toy RM (random init, 2 layers) on dpo_zh_500 + oaast_rm_zh, 10% held out.  To fit the CPU
    budget: max_length 256 and half an epoch (the full toy config, 512 and one epoch, reaches 0.70)."""
    r = reward.run_config(_cfg("data.max_length=256", "data.pad_to_multiple=256", "data.epochs=0.5",
                               "train.eval_every=35", "train.checkpoint_every=0", "train.log_every=35",
                               "rm.norm_samples=16"), str(tmp_path / "run"))
    ev = [m for m in _metrics(r["run_dir"]) if "eval_accuracy" in m]
    print("zh-pref held-out accuracy by step:", [(m["step"], round(m["eval_accuracy"], 3)) for m in ev])
    assert ev[-1]["step"] == 35
    assert ev[-1]["eval_accuracy"] >= 0.6, ev  # 127 held-out pairs: 0.6 is > 2 standard errors above chance

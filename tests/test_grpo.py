"""GRPO: the math against a numpy transcription of the published formulas, the stage's rollout
invariants (ratio 1, KL 0, groups, masks, padding, an empty update changes nothing), convergence
to the exact KL-regularised optimum of the enumerable PPO / DPO toy, and exact resume."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax.rl import grpo_math, rollout
from llama_jax.stages import grpo
from llama_jax.train.config import ConfigError, load_config
from test_ppo import compile_cache  # noqa: F401  (autouse: the resume test's second run hits the XLA cache)
from test_ppo import (EOS, N, PROMPT, TINY, _all_responses, _enum_reward, _lora_b, _logits, _random_model,
                      _response_logprobs, _sequence_logprobs)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "configs", "toy", "grpo.yaml")


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- (a) the math
def _np_grpo(logp, old, ref, adv, mask, lo, hi, beta, agg):
    """The GRPO loss written out in numpy (DeepSeekMath eq. 3 with DAPO's clip-higher and token
    aggregation): per token -min(r A, clip(r, 1-lo, 1+hi) A) + beta (pi_ref/pi - log(pi_ref/pi) - 1)."""
    r = np.exp(logp - old)
    a = adv[:, None]
    per = -np.minimum(r * a, np.clip(r, 1 - lo, 1 + hi) * a) + beta * (np.exp(ref - logp) - (ref - logp) - 1)
    if agg == "token":
        return (per * mask).sum() / mask.sum()
    rows = mask.sum(-1) > 0
    return ((per * mask).sum(-1)[rows] / mask.sum(-1)[rows]).mean()


def test_group_advantages_and_loss_match_the_formulas():
    rewards = np.array([1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5, 2, 0, 1, -1], np.float32)  # 3 groups of 4
    adv, equal, std = grpo_math.group_advantages(jnp.asarray(rewards), 4, scale=True)
    g = rewards.reshape(3, 4)
    want = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(np.asarray(adv), want.reshape(-1), rtol=1e-6, atol=1e-6)
    assert np.asarray(equal).tolist() == [False, True, False]
    assert np.all(np.asarray(adv)[4:8] == 0)  # an all-equal group carries no signal
    adv_dr, _, _ = grpo_math.group_advantages(jnp.asarray(rewards), 4, scale=False)  # Dr. GRPO: no std
    np.testing.assert_allclose(np.asarray(adv_dr), (g - g.mean(1, keepdims=True)).reshape(-1), atol=1e-6)

    rng = np.random.default_rng(0)
    B, Nt = 6, 5
    old = rng.normal(-2, 0.5, (B, Nt)).astype(np.float32)
    logp = (old + rng.normal(0, 0.3, (B, Nt))).astype(np.float32)
    ref = (old + rng.normal(0, 0.2, (B, Nt))).astype(np.float32)
    a = rng.normal(0, 1, B).astype(np.float32)
    mask = (np.arange(Nt)[None] < np.array([5, 3, 1, 4, 0, 2])[:, None]).astype(np.float32)  # one empty row
    for lo, hi, beta, agg in [(0.2, 0.2, 0.0, "token"), (0.2, 0.28, 0.04, "token"), (0.1, 0.3, 0.1, "sequence")]:
        loss, st = grpo_math.grpo_loss(*map(jnp.asarray, (logp, old, ref, a, mask)), clip_low=lo, clip_high=hi,
                                       kl_coef=beta, kl_estimator="k3", aggregation=agg)
        np.testing.assert_allclose(float(loss), _np_grpo(logp, old, ref, a, mask, lo, hi, beta, agg), rtol=1e-5)
        # padding invariance: extra right-padded columns with arbitrary values change neither loss nor gradient
        pad = lambda x, v: np.concatenate([x, np.full((B, 3), v, np.float32)], 1)  # noqa: E731
        f = lambda lp, o, rf, m: grpo_math.grpo_loss(lp, o, rf, jnp.asarray(a), m, clip_low=lo, clip_high=hi,  # noqa: E731
                                                     kl_coef=beta, aggregation=agg)[0]
        l1, g1 = jax.value_and_grad(f)(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(mask))
        l2, g2 = jax.value_and_grad(f)(jnp.asarray(pad(logp, 7.0)), jnp.asarray(pad(old, -9.0)),
                                       jnp.asarray(pad(ref, 3.0)), jnp.asarray(pad(mask, 0.0)))
        assert float(l1) == float(l2)
        np.testing.assert_array_equal(np.asarray(g2)[:, :Nt], np.asarray(g1))
        assert np.all(np.asarray(g2)[:, Nt:] == 0) and np.all(np.asarray(g1)[mask == 0] == 0)
    # clip-higher: a ratio of 1.25 on a positive advantage is clipped at 1 + 0.2, not at 1 + 0.28
    one = lambda hi: grpo_math.grpo_loss(jnp.log(jnp.array([[1.25]])), jnp.zeros((1, 1)), jnp.zeros((1, 1)),  # noqa: E731
                                         jnp.ones(1), jnp.ones((1, 1)), clip_low=0.2, clip_high=hi)[0]
    assert abs(float(one(0.2)) + 1.2) < 1e-6 and abs(float(one(0.28)) + 1.25) < 1e-6
    # an all-masked batch: loss 0 and zero gradient
    z, gz = jax.value_and_grad(lambda lp: grpo_math.grpo_loss(lp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(a),
                                                              jnp.zeros((B, Nt)), kl_coef=0.1)[0])(jnp.asarray(logp))
    assert float(z) == 0.0 and not np.any(np.asarray(gz))


def test_config_errors_name_the_field():
    base = dict(grpo.GRPOOptions().to_dict(), reward_fn="copy_last_token")
    for bad, field in [({"group_size": 1}, "grpo.group_size"), ({"kl_in": "both"}, "grpo.kl_in"),
                       ({"aggregation": "batch"}, "grpo.aggregation"), ({"scale_rewards": "yes"}, "grpo.scale_rewards"),
                       ({"epochs": 1.5}, "grpo.epochs"), ({"groupsize": 4}, "grpo.groupsize"),
                       ({"reward_model": "/x"}, "exactly one of")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            grpo.GRPOOptions.from_dict({**base, **bad}, "grpo.")
    c = grpo.GRPOOptions.from_dict({**base, "clip_high": 0.28, "scale_rewards": False}, "grpo.")
    assert c.clip_high == 0.28 and c.scale_rewards is False and c.group_size == 8


# ----------------------------------------------------------------------------- (b) invariants
def test_step0_invariants_lora_rm(tmp_path):
    """LoRA policy (reference = LoRA off) scored by a reward model: groups of G adjacent rows,
    KL = 0 and ratio = 1 before the first update, log-probs independent of the prompt's left padding,
    an update moves the policy but not the reference; an update whose groups are all dropped
    (every group's rewards equal) changes nothing."""
    cfgm = llama_jax.preset("toy", **TINY)
    llama_jax.save_hf(_random_model(cfgm, 1), tmp_path / "sft")
    llama_jax.save_hf(_random_model(cfgm, 2, head="score"), tmp_path / "rm")
    cfg = load_config(grpo.GRPOConfig, None, [
        f"model.init={tmp_path / 'sft'}", "data.prompt_ids=[[1, 5, 6], [1, 7, 8, 9, 10, 11], [1, 4], [1, 12, 13]]",
        f"grpo.reward_model={tmp_path / 'rm'}", "lora.enabled=true", "lora.rank=4", "lora.alpha=8",
        "grpo.temperature=0.7", "grpo.max_new_tokens=6", "grpo.group_size=4", "train.batch_size=4",
        "grpo.minibatches=2", "grpo.epochs=2", "grpo.clip_high=0.28", "grpo.drop_equal_groups=true",
        "train.lr=1e-2", "mesh.fsdp=1", "train.progress=false", "grpo.kl_coef=0.1",
        "grpo.missing_eos_score=null"])  # null: the constant reward below makes every group equal
    tr = grpo.GRPOTrainer(cfg)
    st = tr.init_state()
    assert tr.lora and tr.B == 16 and all(np.all(b == 0) for b in _lora_b(st["params"]))
    batch, stats = tr.collect(st, 0)
    pid, mask = np.asarray(batch["prompt_ids"]), np.asarray(batch["mask"])
    assert all((pid[4 * g:4 * g + 4] == pid[4 * g]).all() for g in range(4))  # G adjacent copies per prompt
    assert len({tuple(r) for r in np.asarray(batch["tokens"])}) > 4  # really sampled
    adv = np.asarray(batch["advantages"]).reshape(4, 4)
    np.testing.assert_allclose(adv.sum(1), 0, atol=1e-4)  # relative to the group mean
    np.testing.assert_array_equal(np.asarray(batch["logprobs"]), np.asarray(batch["ref_logprobs"]))
    assert float(stats["kl"]) == 0.0
    assert np.all(np.asarray(batch["logprobs"])[mask == 0] == 0)  # nothing after the EOS counts

    # the same responses behind 3 more columns of left padding: the same log-probs
    pm = np.asarray(batch["ids"])[:, :tr.P], np.asarray(batch["attn"])[:, :tr.P]
    ids3 = np.concatenate([np.full((tr.B, 3), tr.pad_id), pm[0]], 1)
    m3 = np.concatenate([np.zeros((tr.B, 3), np.int32), pm[1]], 1)
    exp3 = tr.experience_fn(st["params"], tr.policy_frozen, tr.ref_store, None, None, tr.rm_state,
                            jnp.asarray(ids3, jnp.int32), jnp.asarray(m3), batch["tokens"])
    np.testing.assert_allclose(np.asarray(exp3["logprobs"]), np.asarray(batch["logprobs"]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(exp3["scores"]), np.asarray(batch["scores"]), atol=2e-5)

    # ratio = 1 on rows recomputed by the update's own log-prob function (another batch shape)
    rows = np.arange(5)
    new = _response_logprobs(*nnx.split(tr.policy_model(st)), batch["ids"][rows], batch["attn"][rows],
                             batch["tokens"][rows], 0.7)
    np.testing.assert_allclose(np.exp(np.asarray(new) - np.asarray(batch["logprobs"])[rows]) * mask[rows]
                               + (1 - mask[rows]), 1.0, atol=1e-5)

    # an empty update: every group's rewards equal -> all dropped -> parameters and optimizer untouched
    rm_fn = tr.reward_fn
    tr.reward_fn = lambda p, t, m: np.full(len(t), 0.5, np.float32)
    b0, s0 = tr.collect(st, 0)
    tr.reward_fn = rm_fn
    assert float(s0["equal_groups"]) == 4 and not np.any(np.asarray(b0["row_weight"]))
    before = jax.tree.map(np.asarray, {"p": st["params"], "o": st["opt_state"]})
    st, u0 = tr.update_fn(st, tr.policy_frozen, b0, jax.random.key(0))
    assert float(u0["empty_updates"]) == 4 and float(u0["nonfinite_updates"]) == 0
    after = jax.tree.map(np.asarray, {"p": st["params"], "o": st["opt_state"]})
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))

    base = _logits(tr.reference_model(st), batch["ids"], batch["attn"])
    st, u = tr.update_fn(st, tr.policy_frozen, batch, jax.random.key(0))
    assert float(u["ratio_maxdev_first"]) <= 1e-5 and float(u["empty_updates"]) == 0
    assert float(u["approx_kl"]) > 0  # later minibatches moved the policy
    np.testing.assert_allclose(_logits(tr.reference_model(st), batch["ids"], batch["attn"]), base, atol=1e-6)
    assert np.abs(_logits(tr.policy_model(st), batch["ids"], batch["attn"]) - base).max() > 1e-4
    b2, s2 = tr.collect(st, 1)
    assert float(s2["kl"]) != 0.0
    st, u2 = tr.update_fn(st, tr.policy_frozen, b2, jax.random.key(1))
    assert float(u2["ratio_maxdev_first"]) <= 1e-5  # still 1 after the policy moved

    # compaction: only group 0's rewards differ -> its 4 rows fill the first of the 2 minibatches of
    # 8 in each epoch and the other minibatch is skipped (spread at random, both would run ~99%)
    tr.reward_fn = lambda p, t, m: np.where(np.arange(len(t)) < 4, np.arange(len(t)) % 4, 0.5).astype(np.float32)
    b3, s3 = tr.collect(st, 2)
    tr.reward_fn = rm_fn
    assert float(s3["equal_groups"]) == 3
    _, u3 = tr.update_fn(st, tr.policy_frozen, b3, jax.random.key(2))
    assert float(u3["empty_updates"]) == 2 and float(u3["ratio_maxdev_first"]) <= 1e-5


# ----------------------------------------------------------------------------- (c) exact optimum
def test_grpo_converges_to_exact_kl_regularised_optimum(tmp_path, monkeypatch):
    """The form tested: the KL term in the reward (grpo.kl_in: reward, k1), R(y) = r(y) - beta log(pi(y) /
    pi_ref(y)), group-mean baseline without std scaling (Dr. GRPO: scale_rewards false), token-level
    aggregation.  Then E[(R - mean_group R) grad log pi] = (1 - 1/G) grad (E_pi[r] - beta KL(pi || pi_ref))
    (the score-function gradient of the KL-regularised objective; the group mean baseline only scales it,
    since the other samples of the group are independent of y), whose maximiser over all policies is
        pi*(y) = pi_ref(y) exp(r(y) / beta) / Z,
    the optimum of PPO / DPO on the same toy (tests/test_ppo.py, tests/test_dpo_optimum.py).  (Scaling
    by the group std, sequence-level aggregation (1 / |y| weights) or the k3 estimator as a loss term
    (whose gradient is that of KL(pi_ref || pi) per state) each move the fixed point off pi*.)
    The responses are enumerable (156), so KL(pi || pi*) is exact."""
    monkeypatch.setitem(rollout.REWARDS, "enum_test", _enum_reward)
    beta = 0.25
    over = ["model.init=toy", "model.overrides={vocab_size: 6, hidden_size: 32, intermediate_size: 64, "
            "num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 16, "
            "initializer_range: 0.2}",
            f"data.prompt_ids=[{PROMPT}]", "lora.enabled=false", "grpo.reward_fn=enum_test",
            f"grpo.max_new_tokens={N}", "grpo.temperature=1.0", f"grpo.kl_coef={beta}", "grpo.kl_estimator=k1",
            "grpo.kl_in=reward", "grpo.missing_eos_score=-1.0", "grpo.scale_rewards=false", "grpo.aggregation=token",
            "grpo.group_size=16", "grpo.epochs=2", "grpo.minibatches=2", "train.steps=100", "train.batch_size=8",
            "train.lr=3e-3", "train.schedule=linear", "train.log_every=10", "train.checkpoint_every=0",
            "train.progress=false", "mesh.fsdp=1", "train.seed=0"]
    res = grpo.run_config(load_config(grpo.GRPOConfig, None, over), str(tmp_path / "run"))
    tr = res["trainer"]
    Y = _all_responses()
    lref, mask, has_eos = _sequence_logprobs(tr.reference_model(tr.state), Y)
    assert abs(np.exp(lref).sum() - 1) < 1e-5  # the enumeration covers the sampling distribution
    r = np.where(has_eos, _enum_reward(np.tile(PROMPT, (len(Y), 1)), Y, mask), -1.0)
    lstar = lref + r / beta
    lstar -= np.logaddexp.reduce(lstar)
    kl_to_opt = lambda lp: float(np.sum(np.exp(lp) * (lp - lstar)))  # noqa: E731
    lpi, _, _ = _sequence_logprobs(res["model"], Y)
    kl0, kl1 = kl_to_opt(lref), kl_to_opt(lpi)
    er_ref, er_pi, er_star = (float(np.sum(np.exp(lp) * r)) for lp in (lref, lpi, lstar))
    print(f"\nKL(pi||pi*): {kl0:.4f} -> {kl1:.4f} ({kl0 / kl1:.1f}x); E[r]: ref {er_ref:.4f}, GRPO {er_pi:.4f}, "
          f"optimum {er_star:.4f}")
    # measured (seed 0, this config): KL 1.692 -> 0.0117 (145x), E[r] -0.543 -> 0.164 (optimum 0.161)
    assert kl1 < kl0 / 20, (kl0, kl1)
    assert abs(er_pi - er_star) < 0.1 * abs(er_ref - er_star), (er_ref, er_pi, er_star)
    m = _metrics(res["run_dir"])
    assert m[-1]["eos_rate"] > 0.9 and m[0]["ratio_maxdev_first"] < 1e-5


# ----------------------------------------------------------------------------- (d) exact resume
def test_exact_resume_and_cli(tmp_path):
    """`llama-jax grpo` through the CLI; then the run resumed from its step-2 checkpoint logs exactly
    what it logged uninterrupted (the KL term, dropped groups and clip-higher all on: configs/toy/grpo.yaml)."""
    from llama_jax.cli import main

    run = tmp_path / "run"
    args = ["grpo", TOY, "--out", str(run), "train.steps=4", "train.checkpoint_every=1", "train.log_every=1",
            "train.progress=false", "mesh.fsdp=1", "grpo.max_new_tokens=4", "train.batch_size=4", "grpo.group_size=4"]
    assert main(args) == 0
    first = _metrics(run)
    assert [m["step"] for m in first] == [1, 2, 3, 4] and first[-1]["nonfinite_updates"] == 0
    for s in ("3", "4"):
        shutil.rmtree(run / "checkpoints" / s)
    assert main(args) == 0
    strip = lambda ms: [{k: v for k, v in m.items() if k not in grpo.TIMING_FIELDS} for m in ms]  # noqa: E731
    assert strip(_metrics(run)) == strip(first)  # bitwise: JSON floats are exact reprs
    assert (run / "config.json").exists() and json.loads((run / "config.json").read_text())["grpo"]["group_size"] == 4

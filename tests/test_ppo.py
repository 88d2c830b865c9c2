"""PPO end to end on tiny models: rollout invariants (ratio 1, KL 0), convergence toward the exact
KL-regularised optimum of an enumerable toy, and exact resume after SIGKILL."""
import functools
import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama_jax
from llama_jax.rl import ppo_math, rollout
from llama_jax.stages import ppo
from llama_jax.train.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "configs", "toy", "ppo.yaml")
TINY = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64)
# the toy config, small: shared by the full fine-tuning invariants and the resume test
SMALL = ["train.batch_size=8", "ppo.max_new_tokens=4", "ppo.minibatches=2", "ppo.epochs=2", "train.steps=5",
         "train.log_every=1", "train.checkpoint_every=1", "train.progress=false", "mesh.fsdp=1",
         "ppo.adaptive_kl=true", "ppo.kl_target=0.05", "ppo.kl_horizon=100", "train.schedule=linear"]
CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent XLA cache for this module only: the same programs are compiled again by the
    resume test's runs (in process and in the killed subprocess).  Time only: a cached executable
    computes exactly what a fresh compile does."""
    from jax.experimental.compilation_cache import compilation_cache as cc

    d = str(tmp_path_factory.mktemp("xla-cache"))
    old = {k: getattr(jax.config, k.lower()) for k in ["jax_compilation_cache_dir", *map(str.lower, CACHE_ENV)]}
    jax.config.update("jax_compilation_cache_dir", d)
    for k in CACHE_ENV:
        jax.config.update(k.lower(), 0)
    cc.reset_cache()
    yield {"JAX_COMPILATION_CACHE_DIR": d, **CACHE_ENV}
    for k, v in old.items():
        jax.config.update(k, v)
    cc.reset_cache()


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def _lora_b(params):
    return [np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params) if str(p[-1]) == "b"]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, attn):
    return nnx.merge(graphdef, state)(ids, attn)


def _logits(model, ids, attn):
    return np.asarray(_forward(*nnx.split(model), ids, attn))


@functools.partial(jax.jit, static_argnums=(0, 5))
def _response_logprobs(graphdef, state, ids, attn, tokens, temperature):
    return rollout.response_logprobs(nnx.merge(graphdef, state), ids, attn, tokens, temperature)[0]


def _random_model(cfg, seed, head="lm"):
    """Random weights drawn on the host (an eager init would compile every parameter's init)."""
    graphdef, abstract = nnx.split(llama_jax.abstract_model(cfg, head=head))
    rng = np.random.default_rng(seed)
    flat = [(p, v.replace(jnp.asarray(np.ones(v.shape, np.float32) if "norm" in str(p) else
                                      rng.normal(0, 0.3, v.shape).astype(np.float32))))
            for p, v in nnx.to_flat_state(abstract)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ----------------------------------------------------------------------------- (a) invariants
@pytest.mark.parametrize("mode", ["lora+rm", "full+fn"])
def test_first_minibatch_ratio_one_and_kl_zero(tmp_path, mode):
    """LoRA policy (reference = LoRA off) with a reward model and a LoRA critic from it; full
    fine-tuning (reference = frozen copy) with a reward function and a critic from the policy."""
    if mode == "lora+rm":
        cfgm = llama_jax.preset("toy", **TINY)
        llama_jax.save_hf(_random_model(cfgm, 1), tmp_path / "sft")
        llama_jax.save_hf(_random_model(cfgm, 2, head="score"), tmp_path / "rm")
        cfg = load_config(ppo.PPOConfig, None, [
            f"model.init={tmp_path / 'sft'}", "data.prompt_ids=[[1, 5, 6], [1, 7, 8, 9, 10, 11], [1, 4], [1, 12, 13]]",
            f"ppo.reward_model={tmp_path / 'rm'}", "lora.enabled=true", "lora.rank=4", "lora.alpha=8",
            "ppo.temperature=0.7", "ppo.max_new_tokens=6", "train.batch_size=8", "ppo.minibatches=2", "ppo.epochs=2",
            "train.lr=1e-2", "mesh.fsdp=1", "train.progress=false", "ppo.kl_coef=0.1",
            "ppo.check_fn=copy_last_token", "ppo.score_clip=0.05", "ppo.critic_warmup=1"])
    else:
        cfg = load_config(ppo.PPOConfig, TOY, SMALL)
    T = cfg.ppo.temperature
    tr = ppo.PPOTrainer(cfg)
    st = tr.init_state()
    if mode == "lora+rm":
        assert tr.lora and all(np.all(b == 0) for b in _lora_b(st["params"]))
    else:
        assert not tr.lora
    batch, stats, _ = tr.collect(st, 0)
    mask = np.asarray(batch["mask"])
    if mode == "lora+rm":
        # the RM score is clipped before the missing-EOS score; the checker is logged, not trained on
        sc = np.clip(np.asarray(batch["scores"]), -0.05, 0.05)
        want = np.where(np.asarray(batch["has_eos"]), sc, -1.0).mean()
        assert abs(float(stats["score"]) - want) < 1e-6 and np.abs(np.asarray(batch["scores"])).max() > 0.05
        chk = rollout.REWARDS["copy_last_token"](np.asarray(batch["prompt_ids"]), np.asarray(batch["tokens"]), mask)
        assert abs(float(stats["check_score"]) - chk.mean()) < 1e-6
    assert len({tuple(r) for r in np.asarray(batch["tokens"])}) > 1  # really sampled
    assert len(set(np.asarray(batch["attn"])[:, :4].sum(-1).tolist())) > 1  # prompts of several lengths

    # KL = 0 exactly: the reference is the same computation (LoRA B = 0 / an identical frozen copy)
    np.testing.assert_array_equal(np.asarray(batch["logprobs"]), np.asarray(batch["ref_logprobs"]))
    assert float(stats["kl"]) == 0.0 and float(stats["non_score_reward"]) == 0.0

    # ratio = 1 on a minibatch recomputed by the update's own log-prob function (another batch shape)
    rows = np.arange(4)
    new_logp = _response_logprobs(*nnx.split(tr.policy_model(st)), batch["ids"][rows], batch["attn"][rows],
                                  batch["tokens"][rows], T)
    ratio = np.exp(np.asarray(new_logp) - np.asarray(batch["logprobs"])[rows]) * mask[rows] + (1 - mask[rows])
    np.testing.assert_allclose(ratio, 1.0, atol=1e-5)

    ids, attn = batch["ids"], batch["attn"]
    if mode == "lora+rm":
        # the score lands on the last real token: rescore right-padded (prompt, response, padding)
        a = np.asarray(attn)
        right = np.zeros_like(np.asarray(ids))
        for b in range(len(a)):
            real = np.asarray(ids[b])[a[b] > 0]
            right[b, :len(real)] = real
        rm = llama_jax.load(tmp_path / "rm")
        lens = a.sum(-1)
        s = _logits(rm, jnp.asarray(right), jnp.asarray((np.arange(a.shape[1]) < lens[:, None]).astype(np.int32)))
        np.testing.assert_allclose(s[np.arange(len(a)), lens - 1], np.asarray(batch["scores"]), atol=1e-5)
    else:
        assert np.all(np.asarray(batch["values"]) == 0)  # critic = policy backbone + zero value head
    base = _logits(tr.reference_model(st), ids, attn)
    np.testing.assert_array_equal(_logits(tr.policy_model(st), ids, attn), base)

    if mode == "lora+rm":  # ppo.critic_warmup=1: the first iteration trains the critic only
        host = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]  # noqa: E731
        p0, o0, c0 = host(st["params"]), host(st["opt_state"]), host(st["critic_params"])
        st, uw = tr.update_fn(st, tr.policy_frozen, tr.critic_frozen, batch, jax.random.key(0))
        assert float(uw["policy_updated"]) == 0.0
        for a, b in zip(p0 + o0, host(st["params"]) + host(st["opt_state"])):
            np.testing.assert_array_equal(a, b)
        assert any(np.abs(a - b).max() > 0 for a, b in zip(c0, host(st["critic_params"])))
    st, u = tr.update_fn(st, tr.policy_frozen, tr.critic_frozen, batch, jax.random.key(0))
    assert float(u["ratio_maxdev_first"]) <= 1e-5 and float(u["nonfinite_updates"]) == 0
    assert float(u["policy_updated"]) == 1.0
    assert float(u["approx_kl"]) > 0  # later minibatches did move the policy
    # the reference is still the initial model (LoRA off / frozen copy untouched by donation) ...
    np.testing.assert_allclose(_logits(tr.reference_model(st), ids, attn), base, atol=1e-6)
    # ... while the policy moved away from it
    assert np.abs(_logits(tr.policy_model(st), ids, attn) - base).max() > 1e-4
    if mode == "lora+rm":
        assert any(np.abs(b).max() > 0 for b in _lora_b(st["params"]))
    batch2, stats2, _ = tr.collect(st, 1)
    assert float(stats2["kl"]) != 0.0
    _, u2 = tr.update_fn(st, tr.policy_frozen, tr.critic_frozen, batch2, jax.random.key(1))
    assert float(u2["ratio_maxdev_first"]) <= 1e-5  # still 1 after the policy has moved


def test_hacking_signal():
    """The demo's reward-hacking flag: RM score rising while the never-trained-on checker falls."""
    from llama_jax.demo import hacking_signal

    recs = [{"step": s, "score": 0.1 * s, "check_score": 0.5 - 0.02 * s} for s in (2, 4, 6, 8)]
    h = hacking_signal(recs)
    assert h["hacking"] and abs(h["score_slope"] - 0.1) < 1e-9 and abs(h["check_slope"] + 0.02) < 1e-9
    assert not hacking_signal([{**r, "check_score": 0.1 + 0.01 * r["step"]} for r in recs])["hacking"]
    assert hacking_signal(recs[:2]) is None and hacking_signal([{"step": 1, "score": 0.0}] * 4) is None


# ----------------------------------------------------------------------------- (b) exact optimum
V, EOS, N = 6, 2, 3
PROMPT = [1, 3]


def _enum_reward(prompt_ids, response_ids, mask):
    """r(y) on the response before EOS: [4, 5] -> 1, [4] -> 0.6, any 5 -> 0.3, else 0."""
    out = []
    for y, m in zip(np.asarray(response_ids), np.asarray(mask)):
        body = [int(t) for t, k in zip(y, m) if k > 0 and t != EOS]
        out.append(1.0 if body == [4, 5] else 0.6 if body == [4] else 0.3 if 5 in body else 0.0)
    return np.asarray(out, np.float32)


def _all_responses():
    """Every distinct response under our truncation: body + EOS (padded) for bodies of 0..N-1
    tokens, and the N-token responses without EOS (those score ppo.missing_eos_score)."""
    other = [t for t in range(V) if t != EOS]
    out = [list(b) + [EOS] + [0] * (N - 1 - n) for n in range(N) for b in itertools.product(other, repeat=n)]
    out += [list(b) for b in itertools.product(other, repeat=N)]
    return np.asarray(out, np.int32)


def _sequence_logprobs(model, Y):
    tokens = jnp.asarray(Y)
    pid = jnp.asarray(np.tile(PROMPT, (len(Y), 1)), jnp.int32)
    mask, has_eos = ppo_math.response_mask(tokens, (EOS,))
    ids, attn = rollout.sequence(pid, jnp.ones_like(pid), tokens, mask)
    lp = _response_logprobs(*nnx.split(model), ids, attn, tokens, 1.0)
    return np.asarray(jnp.sum(lp * mask, -1), np.float64), np.asarray(mask), np.asarray(has_eos)


def test_ppo_moves_toward_exact_kl_regularised_optimum(tmp_path, monkeypatch):
    monkeypatch.setitem(rollout.REWARDS, "enum_test", _enum_reward)
    beta, steps = 0.25, 60
    over = ["model.init=toy", "model.overrides={vocab_size: 6, hidden_size: 32, intermediate_size: 64, "
            "num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 16, "
            "initializer_range: 0.2}",
            f"data.prompt_ids=[{PROMPT}]", "lora.enabled=false", "ppo.reward_fn=enum_test", f"ppo.max_new_tokens={N}",
            "ppo.temperature=1.0", f"ppo.kl_coef={beta}", "ppo.kl_estimator=k1", "ppo.missing_eos_score=-1.0",
            "ppo.ent_coef=0.0", "ppo.epochs=4", "ppo.minibatches=2", "ppo.gamma=1.0", "ppo.lam=0.95",
            f"train.steps={steps}", "train.batch_size=32", "train.lr=3e-3", "train.schedule=linear",
            "train.log_every=10", "train.checkpoint_every=0", "train.progress=false", "mesh.fsdp=1", "train.seed=0"]
    cfg = load_config(ppo.PPOConfig, None, over)
    Y = _all_responses()
    assert len(Y) == 1 + 5 + 25 + 125

    res = ppo.run_config(cfg, str(tmp_path / "run"))
    tr = res["trainer"]
    # the reference = the initial policy (unchanged by training: see the invariants test)
    lref, mask, has_eos = _sequence_logprobs(tr.reference_model(tr.state), Y)
    assert abs(np.exp(lref).sum() - 1) < 1e-5  # the enumeration covers the sampling distribution
    r = np.where(has_eos, _enum_reward(np.tile(PROMPT, (len(Y), 1)), Y, mask), -1.0)
    lstar = lref + r / beta
    lstar -= np.logaddexp.reduce(lstar)  # pi* = pi_ref exp(r / beta) / Z

    def kl_to_opt(lp):
        return float(np.sum(np.exp(lp) * (lp - lstar)))

    lpi, _, _ = _sequence_logprobs(res["model"], Y)
    kl0, kl1 = kl_to_opt(lref), kl_to_opt(lpi)
    er_ref, er_pi, er_star = (float(np.sum(np.exp(l) * r)) for l in (lref, lpi, lstar))
    iter_time = np.median([m["iter_time_s"] for m in _metrics(res["run_dir"])][1:])
    print(f"\nKL(pi||pi*): {kl0:.4f} -> {kl1:.4f} ({kl0 / kl1:.1f}x); E[r]: ref {er_ref:.4f}, "
          f"PPO {er_pi:.4f}, optimum {er_star:.4f}; median iteration {iter_time:.3f}s")
    assert kl1 < kl0 / 5, (kl0, kl1)
    assert abs(er_pi - er_star) < 0.25 * abs(er_ref - er_star), (er_ref, er_pi, er_star)
    m = _metrics(res["run_dir"])
    assert m[-1]["kl"] > 0.1 and m[-1]["eos_rate"] > 0.9  # it paid KL for reward, and learned to stop


# ----------------------------------------------------------------------------- (c) exact resume
def test_exact_resume_after_sigkill(tmp_path, capsys, compile_cache):
    cfg = lambda: load_config(ppo.PPOConfig, TOY, SMALL)
    ppo.run_config(cfg(), str(tmp_path / "ref"))
    run = tmp_path / "killed"
    k = subprocess.run([sys.executable, "-m", "llama_jax.cli", "ppo", TOY, "--out", str(run), *SMALL],
                       env={**os.environ, **compile_cache, "LLAMA_JAX_TEST_KILL_AT_STEP": "4"}, capture_output=True,
                       text=True, cwd=REPO)
    assert k.returncode == -9, k.stderr[-2000:]
    # checkpoints are written asynchronously: the kill may tear the newest; resume from the latest whole one
    saved = sorted(int(p) for p in os.listdir(run / "checkpoints") if p.isdigit())
    assert saved and saved[-1] in (1, 2, 3), saved
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4]
    capsys.readouterr()
    ppo.run_config(cfg(), str(run))
    assert f"resuming from checkpoint at step {saved[-1]}" in capsys.readouterr().out
    strip = lambda ms: [{k: v for k, v in m.items() if k not in ppo.TIMING_FIELDS} for m in ms]
    a, b = strip(_metrics(tmp_path / "ref")), strip(_metrics(run))
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    assert len({m["beta"] for m in a}) == 5  # the adaptive controller moved beta every step
    assert a == b  # bitwise: JSON floats are exact reprs

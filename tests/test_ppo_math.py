"""PPO math against direct NumPy formulas: GAE, whitening, clipped losses, rewards, KL, beta."""
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.rl import ppo_math

RNG = np.random.default_rng(0)


def _right_mask(lengths, n):
    return (np.arange(n)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _gae_numpy(r, v, lengths, gamma, lam):
    """Textbook GAE, one row at a time, float64; the episode ends after the last real token."""
    B, N = r.shape
    adv = np.zeros((B, N))
    for b in range(B):
        L, last = lengths[b], 0.0
        for t in reversed(range(L)):
            next_v = v[b, t + 1] if t + 1 < L else 0.0
            delta = r[b, t] + gamma * next_v - v[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    ret = (adv + v) * _right_mask(lengths, N)
    return adv, ret


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.5), (1.0, 0.0)])
def test_gae_matches_numpy(gamma, lam):
    B, N = 7, 11
    lengths = np.array([1, 11, 5, 3, 11, 8, 2])
    mask = _right_mask(lengths, N)
    # garbage (large) values past the end must not leak into advantages
    r = np.where(mask > 0, RNG.normal(size=(B, N)), 1e3).astype(np.float32)
    v = np.where(mask > 0, RNG.normal(size=(B, N)), -1e3).astype(np.float32)
    adv, ret = ppo_math.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(mask), gamma, lam)
    assert adv.dtype == jnp.float32 and ret.dtype == jnp.float32
    want_adv, want_ret = _gae_numpy(r.astype(np.float64), v.astype(np.float64), lengths, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[mask == 0] == 0)


def test_gae_lambda_one_is_return_minus_value():
    B, N = 5, 9
    lengths = np.array([9, 1, 4, 6, 2])
    mask = _right_mask(lengths, N)
    r = (RNG.normal(size=(B, N)) * mask).astype(np.float32)
    v = (RNG.normal(size=(B, N)) * mask).astype(np.float32)
    adv, ret = ppo_math.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(mask), 1.0, 1.0)
    mc_return = np.cumsum(r[:, ::-1], axis=1)[:, ::-1] * mask  # sum of the rewards still to come
    np.testing.assert_allclose(np.asarray(adv), (mc_return - v) * mask, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), mc_return, atol=1e-5)


def test_whiten_over_valid_tokens():
    lengths = np.array([3, 7, 1, 5])
    mask = _right_mask(lengths, 7)
    x = np.where(mask > 0, RNG.normal(3.0, 2.0, size=mask.shape), 99.0).astype(np.float32)
    valid = x[mask > 0].astype(np.float64)
    mean, var = valid.mean(), valid.var(ddof=1)
    w = np.asarray(ppo_math.whiten(jnp.asarray(x), jnp.asarray(mask)))
    np.testing.assert_allclose(w[mask > 0], (valid - mean) / np.sqrt(var + 1e-8), rtol=1e-5, atol=1e-6)
    assert np.all(w[mask == 0] == 0)
    assert abs(w[mask > 0].mean()) < 1e-5 and abs(w[mask > 0].std(ddof=1) - 1) < 1e-4
    w2 = np.asarray(ppo_math.whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=False))
    np.testing.assert_allclose(w2[mask > 0], (valid - mean) / np.sqrt(var + 1e-8) + mean, rtol=1e-5)


def test_clipped_policy_loss_matches_numpy():
    lengths = np.array([6, 2, 4])
    mask = _right_mask(lengths, 6)
    old = RNG.normal(-2, 0.5, size=mask.shape).astype(np.float32)
    new = (old + RNG.normal(0, 0.3, size=mask.shape)).astype(np.float32)
    adv = RNG.normal(size=mask.shape).astype(np.float32)
    loss, st = ppo_math.policy_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), 0.2)
    m = mask > 0
    ratio = np.exp(new.astype(np.float64) - old)[m]
    a = adv[m].astype(np.float64)
    pg = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.2))
    np.testing.assert_allclose(float(loss), pg.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(st["clip_frac"]), np.mean(-a * np.clip(ratio, 0.8, 1.2) > -a * ratio), rtol=1e-6)
    np.testing.assert_allclose(float(st["approx_kl"]), 0.5 * np.mean(np.log(ratio) ** 2), rtol=1e-4)
    np.testing.assert_allclose(float(st["ratio_mean"]), ratio.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(st["ratio_var"]), ratio.var(), rtol=1e-3, atol=1e-7)
    assert 0 < float(st["clip_frac"]) < 1  # the data exercise both branches
    # identical policies: ratio exactly 1, nothing clipped
    _, st0 = ppo_math.policy_loss(jnp.asarray(old), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask))
    assert float(st0["ratio_maxdev"]) == 0 and float(st0["clip_frac"]) == 0 and float(st0["approx_kl"]) == 0


def test_clipped_value_loss_matches_numpy():
    lengths = np.array([5, 3, 1])
    mask = _right_mask(lengths, 5)
    old = RNG.normal(size=mask.shape).astype(np.float32)
    new = (old + RNG.normal(0, 0.4, size=mask.shape)).astype(np.float32)
    ret = RNG.normal(size=mask.shape).astype(np.float32)
    loss, st = ppo_math.value_loss(jnp.asarray(new), jnp.asarray(old), jnp.asarray(ret), jnp.asarray(mask), 0.2)
    m = mask > 0
    v, vo, R = (x[m].astype(np.float64) for x in (new, old, ret))
    vc = vo + np.clip(v - vo, -0.2, 0.2)
    np.testing.assert_allclose(float(loss), 0.5 * np.mean(np.maximum((v - R) ** 2, (vc - R) ** 2)), rtol=1e-5)
    np.testing.assert_allclose(float(st["value_clip_frac"]), np.mean((vc - R) ** 2 > (v - R) ** 2), rtol=1e-6)


def test_response_mask_truncates_after_first_eos():
    EOS = 2
    tokens = np.array([[5, 2, 7, 2, 9],    # EOS at 1: later tokens (and a second EOS) masked
                       [2, 4, 4, 4, 4],    # EOS first: a one-token response
                       [3, 4, 5, 6, 7],    # no EOS: all kept, flagged
                       [3, 4, 5, 6, 2]])   # EOS on the last slot
    mask, has_eos = ppo_math.response_mask(jnp.asarray(tokens), (EOS,))
    np.testing.assert_array_equal(np.asarray(mask), [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1] * 5, [1] * 5])
    np.testing.assert_array_equal(np.asarray(has_eos), [True, True, False, True])
    mask2, _ = ppo_math.response_mask(jnp.asarray(tokens), (EOS, 7))  # several EOS ids
    np.testing.assert_array_equal(np.asarray(mask2)[2], [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(mask2)[0], [1, 1, 0, 0, 0])


def test_rewards_float32_and_score_on_eos_token():
    EOS = 2
    tokens = np.array([[7, 7, 2, 0, 0, 0],   # EOS at 2
                       [2, 0, 0, 0, 0, 0],   # EOS at 0
                       [5, 6, 7, 8, 9, 2],   # EOS at 5
                       [5, 6, 7, 8, 9, 9]])  # no EOS: the score goes on the last token
    mask, _ = ppo_math.response_mask(jnp.asarray(tokens), (EOS,))
    score = jnp.asarray([1, 2, 3, 4], jnp.int32)  # an integer score must not make integer rewards
    kl = jnp.asarray(RNG.normal(size=tokens.shape), jnp.float32)
    rewards, non_score = ppo_math.token_rewards(score, kl, mask, 0.1)
    assert rewards.dtype == jnp.float32 and non_score.dtype == jnp.float32
    r, ns, m = np.asarray(rewards), np.asarray(non_score), np.asarray(mask)
    np.testing.assert_allclose(ns, -0.1 * np.asarray(kl) * m, rtol=1e-6)
    for b, eos_at in enumerate([2, 0, 5, 5]):
        expect = ns[b].copy()
        expect[eos_at] += float(score[b])
        np.testing.assert_allclose(r[b], expect, rtol=1e-6, atol=1e-7)
        assert np.all(r[b, eos_at + 1:] == 0)
    # fractional rewards survive (an integer buffer would truncate 0.25 to 0)
    r2, _ = ppo_math.token_rewards(jnp.asarray([0.25, 0.5, 0.75, 1.0]), jnp.zeros(tokens.shape), mask, 0.0)
    np.testing.assert_allclose(np.asarray(r2).sum(-1), [0.25, 0.5, 0.75, 1.0])


def test_logprobs_with_temperature_and_kl_estimators():
    logits = RNG.normal(size=(2, 3, 11)).astype(np.float32) * 3
    tokens = RNG.integers(0, 11, size=(2, 3))
    for T in (1.0, 0.7):
        lp, ent = ppo_math.logprobs_and_entropy(jnp.asarray(logits), jnp.asarray(tokens), T)
        z = logits.astype(np.float64) / T
        ls = z - np.log(np.exp(z).sum(-1, keepdims=True))
        np.testing.assert_allclose(np.asarray(lp), np.take_along_axis(ls, tokens[..., None], -1)[..., 0], rtol=1e-5)
        np.testing.assert_allclose(np.asarray(ent), -(np.exp(ls) * ls).sum(-1), rtol=1e-5)
    a = RNG.normal(-2, 1, size=20).astype(np.float32)
    b = RNG.normal(-2, 1, size=20).astype(np.float32)
    d = a.astype(np.float64) - b
    np.testing.assert_allclose(np.asarray(ppo_math.kl_estimate(jnp.asarray(a), jnp.asarray(b), "k1")), d, rtol=1e-5)
    k3 = np.asarray(ppo_math.kl_estimate(jnp.asarray(a), jnp.asarray(b), "k3"))
    np.testing.assert_allclose(k3, np.exp(-d) - 1 + d, rtol=1e-4, atol=1e-6)
    assert np.all(k3 >= 0)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        ppo_math.kl_estimate(jnp.asarray(a), jnp.asarray(b), "k9")


def test_kl_controllers():
    fixed = ppo_math.KLController(adaptive=False)
    assert float(ppo_math.next_beta(0.05, 100.0, 64, fixed)) == pytest.approx(0.05)
    ctl = ppo_math.KLController(adaptive=True, target=6.0, horizon=10000.0)
    # KL above target raises beta; the proportional error is clipped to +-0.2
    assert float(ppo_math.next_beta(0.1, 7.2, 512, ctl)) == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000), rel=1e-6)
    assert float(ppo_math.next_beta(0.1, 100.0, 512, ctl)) == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000), rel=1e-6)
    assert float(ppo_math.next_beta(0.1, 5.4, 512, ctl)) == pytest.approx(0.1 * (1 - 0.1 * 512 / 10000), rel=1e-6)
    assert float(ppo_math.next_beta(0.1, 0.0, 512, ctl)) == pytest.approx(0.1 * (1 - 0.2 * 512 / 10000), rel=1e-6)

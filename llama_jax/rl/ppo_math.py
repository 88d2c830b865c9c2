"""PPO for language models: the math, as pure jnp functions in float32.

Shapes: B sequences, N response tokens.  Every per-token array is [B, N] and is paired with a
response mask that is 1 from the first response token up to and including the first EOS and 0
after it ("right-masked"): padding never contributes to a sum, a mean, an advantage or a loss.

Conventions follow the TRL / "N+ implementation details of RLHF with PPO" recipe:
* one log-prob function for old, reference and new policies: log_softmax(logits / T);
* per-token reward = -beta * KL estimate, plus the sequence score on the last real token;
* GAE with the value after the last real token taken as 0 (the episode ends at EOS);
* advantages whitened over the valid tokens of the whole rollout batch;
* policy loss max(-A r, -A clip(r)); value loss 0.5 max((V - R)^2, (V_clip - R)^2).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32


# ----------------------------------------------------------------------------- log-probs
def logprobs_and_entropy(logits, tokens, temperature: float = 1.0):
    """logits [..., V], tokens [...] -> (log pi(token) [...], entropy [...]) under
    softmax(logits / T).  The single log-prob function for old, reference and new policies, so that
    ratio and KL compare like with like (a mismatch here shows up as ratio != 1 before any update)."""
    lp = jax.nn.log_softmax(logits.astype(F32) / jnp.asarray(temperature, F32), axis=-1)
    taken = jnp.take_along_axis(lp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(lp) * lp, axis=-1)
    return taken, entropy


def logprobs(logits, tokens, temperature: float = 1.0):
    return logprobs_and_entropy(logits, tokens, temperature)[0]


# ----------------------------------------------------------------------------- masks
def response_mask(tokens, eos_ids):
    """tokens [B, N] -> (mask float32 [B, N]: 1 up to and including the first EOS, has_eos bool [B])."""
    eos = jnp.asarray(tuple(eos_ids) if eos_ids else (-1,), jnp.int32)
    is_eos = jnp.isin(tokens, eos)
    seen_before = (jnp.cumsum(is_eos.astype(jnp.int32), axis=-1) - is_eos.astype(jnp.int32)) > 0
    return (~seen_before).astype(F32), jnp.any(is_eos, axis=-1)


def last_index(mask):
    """Index of the last real token of each right-masked row ([B] int32; 0 for an empty row)."""
    return jnp.maximum(jnp.sum(mask, axis=-1).astype(jnp.int32) - 1, 0)


def masked_sum(x, mask, axis=None):
    return jnp.sum(x.astype(F32) * mask, axis=axis)


def masked_mean(x, mask, axis=None):
    # max(.., 1): an all-masked minibatch gives 0, not NaN
    return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_var(x, mask, unbiased: bool = True):
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x.astype(F32) - mean), mask)
    if unbiased:  # Bessel's correction, as TRL's masked_var
        n = jnp.sum(mask)
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
    """(x - mean) / sqrt(var + eps) over the valid entries; masked entries become 0."""
    x = x.astype(F32)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    w = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        w = w + mean
    return w * mask


# ----------------------------------------------------------------------------- KL and rewards
def kl_estimate(logp, ref_logp, kind: str = "k1"):
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.
    k1 = log pi - log pi_ref (unbiased, can be negative per token);
    k2 = 0.5 (log pi - log pi_ref)^2; k3 = (r - 1) - log r with r = pi_ref / pi (unbiased, >= 0)."""
    d = logp.astype(F32) - ref_logp.astype(F32)
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return jnp.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {kind!r} (k1, k2, k3)")


def token_rewards(score, kl, mask, beta):
    """(rewards, non_score) [B, N] float32: rewards = -beta * kl on every valid token, plus the
    sequence score on the last valid token (the EOS when the response has one)."""
    mask = mask.astype(F32)
    non_score = -jnp.asarray(beta, F32) * kl.astype(F32) * mask
    N = mask.shape[-1]
    at_last = (jnp.arange(N)[None, :] == last_index(mask)[:, None]) & (jnp.sum(mask, -1) > 0)[:, None]
    rewards = non_score + at_last.astype(F32) * score.astype(F32)[:, None]
    return rewards, non_score


class KLController(NamedTuple):
    """Fixed beta, or Ziegler et al. (2019)'s adaptive one: beta <- beta (1 + e n / horizon) with
    e = clip(KL / target - 1, -0.2, 0.2) and n the number of samples just seen."""
    adaptive: bool = False
    target: float = 6.0
    horizon: float = 10000.0


def next_beta(beta, kl, n_samples, ctl: KLController):
    beta = jnp.asarray(beta, F32)
    if not ctl.adaptive:
        return beta
    err = jnp.clip(jnp.asarray(kl, F32) / ctl.target - 1.0, -0.2, 0.2)
    return beta * (1.0 + err * jnp.asarray(n_samples, F32) / ctl.horizon)


# ----------------------------------------------------------------------------- GAE
def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over right-masked responses, float32, scanned backwards.

    delta_t = r_t + gamma m_{t+1} V_{t+1} - V_t;  A_t = delta_t + gamma lam m_{t+1} A_{t+1}.
    m_{t+1} = 0 past the last real token: the episode ends there, nothing is bootstrapped from
    padding.  Returns (advantages, returns = A + V), both 0 on masked tokens."""
    m = mask.astype(F32)
    r, v = rewards.astype(F32) * m, values.astype(F32) * m
    zeros = jnp.zeros_like(m[:, :1])
    next_m = jnp.concatenate([m[:, 1:], zeros], axis=1)
    next_v = jnp.concatenate([v[:, 1:], zeros], axis=1)
    delta = r + gamma * next_m * next_v - v

    def step(carry, x):
        d, nm = x
        a = d + gamma * lam * nm * carry
        return a, a

    _, adv = jax.lax.scan(step, jnp.zeros_like(m[:, 0]), (delta.T, next_m.T), reverse=True)
    adv = adv.T * m
    return adv, (adv + v) * m


# ----------------------------------------------------------------------------- losses
def clipped_surrogate(logp, old_logp, advantages, mask, clip_low: float = 0.2, clip_high: float | None = None):
    """Per-token clipped surrogate max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)) [B, N] (to
    minimise; clip_high None = clip_low, > clip_low is DAPO's "clip-higher") and its diagnostics,
    means over valid tokens.  `advantages` broadcasts against [B, N] (per token, or [B, 1])."""
    clip_high = clip_low if clip_high is None else clip_high
    mask = mask.astype(F32)
    log_ratio = (logp.astype(F32) - old_logp.astype(F32)) * mask
    ratio = jnp.exp(log_ratio)
    adv = advantages.astype(F32)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = (pg2 > pg1).astype(F32)
    stats = {
        "clip_frac": masked_mean(clipped, mask),
        "approx_kl": 0.5 * masked_mean(jnp.square(log_ratio), mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_var": masked_var(ratio, mask, unbiased=False),
        "ratio_maxdev": jnp.max(jnp.abs(ratio - 1.0) * mask),
    }
    if clip_high != clip_low:
        stats["clip_frac_low"] = masked_mean(clipped * (ratio < 1.0), mask)
        stats["clip_frac_high"] = masked_mean(clipped * (ratio > 1.0), mask)
    return jnp.maximum(pg1, pg2), stats


def policy_loss(logp, old_logp, advantages, mask, clip: float = 0.2):
    """Clipped surrogate (to minimise) and its diagnostics, means over valid tokens."""
    per_token, stats = clipped_surrogate(logp, old_logp, advantages, mask, clip)
    return masked_mean(per_token, mask.astype(F32)), stats


def value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """0.5 max((V - R)^2, (V_old + clip(V - V_old) - R)^2), mean over valid tokens."""
    mask = mask.astype(F32)
    v, v_old, ret = values.astype(F32), old_values.astype(F32), returns.astype(F32)
    v_clipped = v_old + jnp.clip(v - v_old, -clip, clip)
    sq, sq_clipped = jnp.square(v - ret), jnp.square(v_clipped - ret)
    loss = 0.5 * masked_mean(jnp.maximum(sq, sq_clipped), mask)
    return loss, {"value_clip_frac": masked_mean((sq_clipped > sq).astype(F32), mask)}

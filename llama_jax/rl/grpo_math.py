"""GRPO (group relative policy optimisation) for language models: the math, pure jnp in float32.

Shapes as in `ppo_math`: B = prompts x G sequences, rows of one prompt's group adjacent
(row b belongs to group b // G), N response tokens, right-masked responses.

* `group_advantages`: A_i = r_i - mean(group), divided by the group's std (unbiased, + eps, as
  TRL's GRPOTrainer) when `scale`; `scale=False` is Dr. GRPO's form (Liu et al. 2025), which keeps
  easy and hard prompts on one scale.  Groups whose rewards are all equal carry no signal (every
  A_i = 0); they are flagged, so the stage can count them and drop them from the update.
* `grpo_loss`: per token, the clipped surrogate with asymmetric bounds (1 - eps_low, 1 + eps_high;
  eps_high > eps_low is DAPO's clip-higher) plus, when kl_coef > 0, kl_coef x a per-token KL
  estimate to the reference (k3 by default, as DeepSeekMath / TRL), aggregated per token over the
  whole minibatch ("token", DAPO) or per sequence then over sequences ("sequence", the original
  GRPO).  The sequence form weights a long response's tokens less (the length bias Dr. GRPO
  removes); with a sequence-level reward only the token form's expected gradient is the policy
  gradient of E[r] (tests/test_grpo.py's optimum test uses it).
"""
from __future__ import annotations

import jax.numpy as jnp

from .ppo_math import F32, clipped_surrogate, kl_estimate, masked_mean

AGGREGATIONS = ("token", "sequence")


def group_advantages(rewards, group_size: int, scale: bool = True, eps: float = 1e-4, equal_tol: float = 1e-6):
    """rewards [B] (B = groups x G, a group's rows adjacent) -> (advantages [B], equal [B / G] bool:
    the group's rewards are all equal within `equal_tol`, group std [B / G])."""
    r = rewards.astype(F32).reshape(-1, group_size)
    mean = jnp.mean(r, axis=1, keepdims=True)
    std = jnp.std(r, axis=1, keepdims=True, ddof=1) if group_size > 1 else jnp.zeros_like(mean)
    adv = r - mean
    if scale:
        adv = adv / (std + eps)
    equal = (jnp.max(r, axis=1) - jnp.min(r, axis=1)) <= equal_tol
    return adv.reshape(-1), equal, std[:, 0]


def aggregate(per_token, mask, how: str = "token"):
    """Scalar loss from per-token terms [B, N]: the mean over every valid token of the batch
    ("token"), or the mean over sequences with any valid token of each one's token mean ("sequence")."""
    mask = mask.astype(F32)
    if how == "token":
        return masked_mean(per_token, mask)
    if how == "sequence":
        per_seq = masked_mean(per_token, mask, axis=-1)
        has = (jnp.sum(mask, axis=-1) > 0).astype(F32)
        return jnp.sum(per_seq * has) / jnp.maximum(jnp.sum(has), 1.0)
    raise ValueError(f"unknown loss aggregation {how!r} ({', '.join(AGGREGATIONS)})")


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, *, clip_low: float = 0.2, clip_high: float | None = None,
              kl_coef: float = 0.0, kl_estimator: str = "k3", aggregation: str = "token"):
    """GRPO's loss (to minimise) and diagnostics.  logp / old_logp / ref_logp / mask [B, N],
    advantages [B] (one per sequence, every token of it).  Rows whose mask is all 0 (dropped
    groups, empty responses) contribute nothing; an all-0 mask gives loss 0 and zero gradients."""
    mask = mask.astype(F32)
    per_token, stats = clipped_surrogate(logp, old_logp, advantages.astype(F32)[:, None], mask, clip_low, clip_high)
    pg = aggregate(per_token, mask, aggregation)
    stats["pg_loss"] = pg
    if kl_coef:
        kl = kl_estimate(logp, ref_logp, kl_estimator)
        kl_term = aggregate(kl, mask, aggregation)
        stats["kl_loss"] = kl_term
        return pg + jnp.asarray(kl_coef, F32) * kl_term, stats
    return pg, stats

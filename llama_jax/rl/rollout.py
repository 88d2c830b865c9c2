"""PPO rollouts: sample responses with the KV-cache decoder, then score them teacher-forced.

Sampling reuses `generate.prefill` / `generate.decode` (left-padded prompts, one while_loop,
donated cache) with plain temperature sampling: top-k / top-p would make the sampling
distribution differ from log_softmax(logits / T), and PPO's ratio and KL would then be wrong.
Everything PPO needs afterwards (old and reference log-probs, values, reward-model score) comes
from one teacher-forced forward pass per model over prompt + response, so the training step,
which uses the same functions, sees ratio = 1 before its first update.

Layout: prompts [B, P] left-padded, responses [B, N] (N = max_new_tokens, static); the whole
sequence is [B, P + N] with attention mask = prompt mask ++ response mask, so the positions of
response tokens continue each prompt's own length, exactly as in decode.
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..generate import SamplingParams, decoder, prefill
from ..lora import lora_off
from ..model import Cache
from ..sharding import named_sharding
from . import ppo_math


# ----------------------------------------------------------------------------- sampling
def init_cache(cfg, batch: int, length: int, mesh=None) -> Cache:
    """A KV cache; with a mesh it is created already sharded over the batch (a 7B cache for a
    whole rollout batch does not fit on one device)."""
    if mesh is None:
        return Cache.init(cfg, batch, length)
    return cache_maker(cfg, batch, length, mesh)()


@functools.lru_cache(maxsize=8)
def cache_maker(cfg, batch: int, length: int, mesh):
    """A jitted zero-argument function returning an empty KV cache sharded over `mesh` (batch over
    the data axes); one per (cfg, batch, length, mesh), cached, since a fresh lambda every rollout
    would recompile."""
    make = lambda: Cache.init(cfg, batch, length, mesh=mesh)  # noqa: E731
    kv = jax.eval_shape(make).k  # the layout the mesh's platform takes: stacked or a tuple of layers
    axes = Cache.layer_axes(stacked=not isinstance(kv, tuple))
    kv_sh = jax.tree.map(lambda a: named_sharding(mesh, axes, a.shape), kv)
    slot_sh = named_sharding(mesh, ("batch", "cache_length"), (batch, length))
    out = Cache(kv_sh, kv_sh, slot_sh, slot_sh, named_sharding(mesh, (), ()))
    return jax.jit(make, out_shardings=out)




def _call(name, fn, *args, **kwargs):
    return fn(*args, **kwargs)


def sample_responses(graphdef, state, cfg, prompt_ids, prompt_mask, rng, *, max_new_tokens: int,
                     temperature: float, eos_ids: tuple, pad_id: int, mesh=None, positions=None, call=_call,
                     decoder_fn=decoder):
    """Sampled response tokens [B, N] (pad_id after a row's EOS).  `state` is the model's whole
    nnx state (e.g. nnx.merge_state(trainable, frozen)), `cfg` its LlamaConfig; `positions` the
    prompts' lengths (default: the mask's row sums).  The jitted pieces (cache init, prefill,
    decode) run through `call(name, fn, *args)` and the decoder is `decoder_fn()`'s: the planner
    passes its own to lower them for another platform (stages.rollout_trainer.RolloutTrainer.call)."""
    if temperature <= 0:
        raise ValueError("PPO samples at temperature > 0 (greedy decoding has no log-probs to ratio)")
    B, P = prompt_ids.shape
    if mesh is None:
        cache = Cache.init(cfg, B, P + max_new_tokens)
    else:
        cache = call("rollout_cache", cache_maker(cfg, B, P + max_new_tokens, mesh))
    logits, cache = call("rollout_prefill", prefill, graphdef, state, prompt_ids, prompt_mask, cache, fresh=True)
    if positions is None:
        positions = jnp.sum(prompt_mask, axis=-1).astype(jnp.int32)
    sp = SamplingParams(int(max_new_tokens), float(temperature), 0, 1.0)
    dec, hoist = decoder_fn()
    tokens, _ = call("rollout_decode", dec, graphdef, state, cache, logits, positions, rng, sp, tuple(eos_ids),
                     int(pad_id), None, hoist_layers=hoist)
    return tokens


# ----------------------------------------------------------------------------- teacher-forced passes
def sequence(prompt_ids, prompt_mask, tokens, mask):
    """prompt ++ response ids and attention mask, [B, P + N]."""
    ids = jnp.concatenate([prompt_ids, tokens], axis=1).astype(jnp.int32)
    attn = jnp.concatenate([prompt_mask.astype(jnp.int32), mask.astype(jnp.int32)], axis=1)
    return ids, attn


def response_logprobs(model, ids, attn, tokens, temperature: float):
    """(log pi(response token) [B, N], entropy [B, N]) from one forward pass.  The logits at
    position P-1+t predict response token t; the vocabulary projection is applied to those N
    positions only."""
    P = ids.shape[1] - tokens.shape[1]
    h = model(ids, attn, return_hidden=True)
    logits = model.project(h[:, P - 1:-1])
    return ppo_math.logprobs_and_entropy(logits, tokens, temperature)


def response_values(critic, ids, attn, n: int):
    """V(s_t) [B, N]: the critic's output at the token before response token t."""
    P = ids.shape[1] - n
    return critic(ids, attn)[:, P - 1:-1].astype(jnp.float32)


def sequence_scores(reward_model, ids, attn, mask):
    """Reward-model score [B] on the last real token of prompt + response (the EOS)."""
    P = ids.shape[1] - mask.shape[1]
    s = reward_model(ids, attn)
    idx = P - 1 + jnp.sum(mask, axis=-1).astype(jnp.int32)
    return jnp.take_along_axis(s, idx[:, None], axis=1)[:, 0].astype(jnp.float32)


def reference_state(trainable, ref_store):
    """The reference policy's trainable state, built from the current one without a second copy
    of the frozen weights: LoRA factors B -> 0 (LoRA off; A is then irrelevant), and every other
    trainable leaf (full fine-tuning, or LoRA's trainable_modules) from `ref_store`, the frozen
    copy of its initial value.  Traceable: call inside jit."""
    store = {tuple(p): v for p, v in nnx.to_flat_state(ref_store)}
    flat = []
    for path, v in nnx.to_flat_state(trainable):
        path = tuple(path)
        if path in store:
            v = v.replace(store[path].get_value())
        elif not isinstance(v, nnx.LoRAParam):
            raise ValueError(f"reference_state: no reference value for trainable {'.'.join(map(str, path))}")
        flat.append((path, v))
    return lora_off(nnx.from_flat_state(flat))


def reference_store(trainable):
    """What `reference_state` needs kept: a copy of every trainable leaf that is not a LoRA factor
    (copied because the trainable buffers are donated to the update and change)."""
    flat = [(p, v.replace(jnp.copy(v.get_value()))) for p, v in nnx.to_flat_state(trainable)
            if not isinstance(v, nnx.LoRAParam)]
    return nnx.from_flat_state(flat)


def make_experience_fn(policy_graphdef, critic_graphdef, rm_graphdef, *, temperature: float, eos_ids: tuple):
    """jit(fn(policy, policy_frozen, ref_store, critic, critic_frozen, rm_state, prompt_ids,
    prompt_mask, tokens) -> dict) with the response mask, EOS flags, the full sequence, old and
    reference log-probs, values and (with a reward model) scores.  rm_graphdef None: no RM;
    critic_graphdef None: no critic (GRPO; pass None for critic and critic_frozen), no values."""

    def fn(pol, pol_frz, ref_store, crit, crit_frz, rm_state, prompt_ids, prompt_mask, tokens):
        mask, has_eos = ppo_math.response_mask(tokens, eos_ids)
        ids, attn = sequence(prompt_ids, prompt_mask, tokens, mask)
        policy = nnx.merge(policy_graphdef, pol, pol_frz)
        logp, entropy = response_logprobs(policy, ids, attn, tokens, temperature)
        ref = nnx.merge(policy_graphdef, reference_state(pol, ref_store), pol_frz)
        ref_logp, _ = response_logprobs(ref, ids, attn, tokens, temperature)
        out = {"tokens": tokens, "mask": mask, "has_eos": has_eos, "ids": ids, "attn": attn,
               "logprobs": logp * mask, "ref_logprobs": ref_logp * mask, "rollout_entropy": entropy}
        if critic_graphdef is not None:
            critic = nnx.merge(critic_graphdef, crit, crit_frz)
            out["values"] = response_values(critic, ids, attn, tokens.shape[1]) * mask
        if rm_graphdef is not None:
            out["scores"] = sequence_scores(nnx.merge(rm_graphdef, rm_state), ids, attn, mask)
        return out

    return jax.jit(fn)


# ----------------------------------------------------------------------------- reward functions
def _copy_last_token(prompt_ids, response_ids, mask):
    """Toy verifiable reward: the share of response tokens (EOS excluded) equal to the prompt's
    last token; an empty answer scores 0.  Learnable by a tiny model in a few dozen iterations."""
    prompt_ids, response_ids, mask = (np.asarray(x) for x in (prompt_ids, response_ids, mask))
    body = mask.copy().astype(np.float32)
    body[np.arange(len(body)), np.maximum(body.sum(-1).astype(int) - 1, 0)] = 0.0  # drop the last (EOS) token
    hits = (response_ids == prompt_ids[:, -1:]).astype(np.float32) * body
    return (hits.sum(-1) / np.maximum(body.sum(-1), 1.0)).astype(np.float32)


# name -> fn(prompt_ids [B, P] left-padded, response_ids [B, N], mask [B, N] float32) -> float32 [B].
# Called on host (numpy) arrays, so any Python works (e.g. decode and check an answer).  Register
# more by adding entries, or name one as "package.module:function" in ppo.reward_fn.
REWARDS: dict[str, Callable] = {
    "copy_last_token": _copy_last_token,
}


def get_reward_fn(name: str, factory_args: dict | None = None) -> Callable:
    """A reward function by name; with `factory_args` the name is a factory, called with them
    (e.g. "llama_jax.synthetic:exact_match_reward" with {"tokenizer": DIR})."""
    fn = _lookup_reward(name)
    return fn(**factory_args) if factory_args else fn


def _lookup_reward(name: str) -> Callable:
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        mod, attr = name.split(":", 1)
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward function {name!r}: {e}") from None
    raise ValueError(f"unknown reward function {name!r}; registered: {', '.join(sorted(REWARDS))} "
                     "(or give 'module:function')")

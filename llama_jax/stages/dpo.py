"""DPO on the shared loop: sigmoid, hinge and IPO losses (TRL's formulas).

Reference log-probs come from the LoRA-off policy (same weights, no second copy) when LoRA
trains only adapters, and are otherwise precomputed once with the initial model before the first
step (exact for full fine-tuning and for LoRA with full embed/lm_head modules).
Δ = (logπ(c) − logπ_ref(c)) − (logπ(r) − logπ_ref(r));  sigmoid: −log σ(βΔ);  hinge: relu(1 − βΔ);
ipo: (Δ − 1/(2β))² with log-probs averaged over response tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..data.packing import StepIndexedBatches
from ..lora import lora_off
from ..data.preference import load_pairs, pair_batch
from ..data.sources import DataError, expand
from ..train.config import ConfigError, RunConfig, Section, load_config, opt
from ..train.loop import Task
from .supervised import PairData, eval_batches, flops_per_token, run_stage

LOSSES = ("sigmoid", "hinge", "ipo")


@dataclass
class DPOOptions(Section):
    beta: float = opt(0.1, "beta: strength of the implicit KL to the reference")
    loss: str = opt("sigmoid", "sigmoid (DPO), hinge (SLiC) or ipo", LOSSES)
    reference: str = opt("auto", "reference log-probs: lora_off (same weights, LoRA off), precomputed, or auto",
                         ("auto", "lora_off", "precomputed"))


@dataclass
class DPOConfig(RunConfig):
    data: PairData = field(default_factory=PairData, metadata={"doc": "preference pairs"})
    dpo: DPOOptions = field(default_factory=DPOOptions, metadata={"doc": "the DPO loss"})


def sequence_logps(model, input_ids, attention_mask, loss_mask, average: bool = False):
    """Sum (or mean) of log p(token_t | < t) over response tokens, per row, float32."""
    logits = model(input_ids, attention_mask)[:, :-1].astype(jnp.float32)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), input_ids[:, 1:, None], -1)[..., 0]
    m = loss_mask[:, 1:].astype(jnp.float32)
    s = jnp.sum(lp * m, -1)
    return s / jnp.maximum(jnp.sum(m, -1), 1.0) if average else s


def dpo_loss(pol_c, pol_r, ref_c, ref_r, beta: float, kind: str):
    """Per-pair losses and the implicit rewards, from (summed or averaged) log-probs."""
    delta = (pol_c - ref_c) - (pol_r - ref_r)
    if kind == "sigmoid":
        loss = -jax.nn.log_sigmoid(beta * delta)
    elif kind == "hinge":
        loss = jax.nn.relu(1.0 - beta * delta)
    elif kind == "ipo":
        loss = (delta - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ConfigError(f"dpo.loss: {kind!r} is not one of {LOSSES}")
    return loss, beta * (pol_c - ref_c), beta * (pol_r - ref_r)


def _pair_arrays(pairs, T, pad):
    """Fixed-shape arrays per pair (chosen and rejected rows side by side), for step indexing."""
    b = pair_batch(pairs, pad)
    width = b["input_ids"].shape[1]
    if width > T:
        raise DataError(f"pair longer than data.max_length={T}")
    B = len(pairs)
    out = {}
    for k, v in b.items():
        v = np.pad(v, ((0, 0), (0, T - width)), constant_values=pad if k == "input_ids" else 0)
        out[k] = np.stack([v[:B], v[B:]], axis=1)  # [N, 2, T]
    out["pair_index"] = np.arange(B, dtype=np.int32)
    return out


def make_loss(beta: float, kind: str, lora_reference: bool):
    average = kind == "ipo"

    def loss_fn(model, batch, rng):
        ids = batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1])
        am = batch["attention_mask"].reshape(ids.shape)
        lm = batch["loss_mask"].reshape(ids.shape)
        B = batch["input_ids"].shape[0]
        # rows interleave chosen/rejected per pair: [c0, r0, c1, r1, ...]
        lp = sequence_logps(model, ids, am, lm, average).reshape(B, 2)
        if lora_reference:
            graphdef, state = nnx.split(model)
            ref_model = nnx.merge(graphdef, lora_off(state))  # same weights, LoRA off: no second copy
            ref = jax.lax.stop_gradient(sequence_logps(ref_model, ids, am, lm, average).reshape(B, 2))
        else:
            ref = jnp.stack([batch["ref_chosen"], batch["ref_rejected"]], -1)
        loss, rc, rr = dpo_loss(lp[:, 0], lp[:, 1], ref[:, 0], ref[:, 1], beta, kind)
        aux = {"accuracy": jnp.sum((rc > rr).astype(jnp.float32)), "margin": jnp.sum(rc - rr),
               "reward_chosen": jnp.sum(rc), "reward_rejected": jnp.sum(rr),
               "logp_chosen": jnp.sum(lp[:, 0]), "logp_rejected": jnp.sum(lp[:, 1])}
        return jnp.sum(loss), jnp.float32(B), aux

    return loss_fn


def precompute_reference(model, arrays, batch_size: int, average: bool = False):
    """Reference log-probs of every pair with the (initial) model, in fixed-size jitted chunks
    (`average`: per-token means, IPO's)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(st, ids, am, lm):
        m = nnx.merge(graphdef, st)
        return sequence_logps(m, ids, am, lm, average)

    N, _, T = arrays["input_ids"].shape
    outs = []
    for i in range(0, N, batch_size):
        sl = slice(i, min(i + batch_size, N))
        n = sl.stop - sl.start
        pad = lambda a: np.pad(a[sl], ((0, batch_size - n), (0, 0), (0, 0))).reshape(-1, T)
        lp = np.asarray(f(state, pad(arrays["input_ids"]), pad(arrays["attention_mask"]), pad(arrays["loss_mask"])))
        outs.append(lp.reshape(batch_size, 2)[:n])
    lp = np.concatenate(outs)
    return lp[:, 0].astype(np.float32), lp[:, 1].astype(np.float32)


def build_task(cfg: DPOConfig, tok, model, lora_reference: bool):
    dc, tc, pc = cfg.data, cfg.train, cfg.dpo
    T = dc.max_length
    if T > model.config.max_position_embeddings:
        raise ConfigError(f"data.max_length={T} exceeds max_position_embeddings={model.config.max_position_embeddings}")
    files = expand(cfg.paths(dc.train_files))
    pairs, stats = load_pairs(files, tok, dc.template, T, dc.on_error, dc.max_prompt_length)
    print(f"dpo data: {stats.report()}")
    if dc.eval_files:
        eval_pairs, _ = load_pairs(expand(cfg.paths(dc.eval_files)), tok, dc.template, T, dc.on_error,
                                   dc.max_prompt_length)
    else:
        n_eval = max(1, int(len(pairs) * dc.eval_fraction))
        if n_eval >= len(pairs):
            raise DataError(f"{files}: {len(pairs)} pair(s) are too few to hold out an eval set")
        pairs, eval_pairs = pairs[:-n_eval], pairs[-n_eval:]
    pad = getattr(tok, "pad_token_id", None) or 0
    G = tc.batch_size
    arrays, ev = _pair_arrays(pairs, T, pad), _pair_arrays(eval_pairs, T, pad)
    if not lora_reference:
        for a in (arrays, ev):
            a["ref_chosen"], a["ref_rejected"] = precompute_reference(model, a, G, average=pc.loss == "ipo")
    host, nh = jax.process_index(), jax.process_count()
    eval_list = eval_batches({k: v for k, v in ev.items() if k != "pair_index"}, G, tc.eval_batches)
    train_arrays = {k: v for k, v in arrays.items() if k != "pair_index"}
    return Task(name="dpo", loss_fn=make_loss(pc.beta, pc.loss, lora_reference),
                train=StepIndexedBatches(train_arrays, G, tc.seed, host, nh), eval_batches=eval_list,
                flops_per_token=flops_per_token(model.config, T) * (1.5 if lora_reference else 1.0),
                tokens_per_row=2 * T, extra_meta={"pairs": len(pairs)}, perplexity=False)


def run(config_path, out: str | None = None, overrides=()) -> dict:
    return run_config(load_config(DPOConfig, config_path, list(overrides)), out)


def run_config(cfg: DPOConfig, out: str | None = None) -> dict:
    lc, ref = cfg.lora, cfg.dpo.reference
    lora_ref_ok = lc.enabled and not lc.trainable_modules
    if ref == "auto":
        ref = "lora_off" if lora_ref_ok else "precomputed"
    if ref == "lora_off" and not lora_ref_ok:
        raise ConfigError("dpo.reference=lora_off needs LoRA without trainable_modules (those would change the "
                          "reference); use 'precomputed'")
    # the task precomputes reference log-probs (if any) before LoRA is attached or any update
    result = run_stage(cfg, out, "dpo", lambda c, tok, m, _: build_task(c, tok, m, lora_reference=ref == "lora_off"))
    result["reference"] = ref
    return result

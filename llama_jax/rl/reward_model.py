"""The reward model's pieces: scores at the last real token, the Bradley–Terry pair loss, a score
head on a language model's backbone, and the normalisation offset stored beside a trained RM.

The model is the Llama backbone with the bias-free scalar head (`Llama(head="score")`, HF
LlamaForSequenceClassification with num_labels=1).  A sequence's reward is the head's output at
its last real token, i.e. the EOS closing `prompt + response + EOS`; the last real token is found
from the attention mask, so left and right padding give the same score.

Loss per pair: -log σ(r_c − r_r − margin) + center_coef · (r_c + r_r)²; accuracy P(r_c > r_r) and
the mean margin r_c − r_r are returned as aux sums for the training loop.  A normalised reward
is `score − offset` (a bias-free head cannot absorb a constant), the offset being the mean raw
score of reference responses (`reward_norm.json`, and `reward_offset` in an exported config.json).
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..fsutil import write_text_atomic
from ..model import abstract_model
from ..sharding import named_sharding

NORM_FILE = "reward_norm.json"


def last_token_index(mask):
    """Index of the rightmost real token of each row (works for left and right padding)."""
    T = mask.shape[-1]
    return jnp.argmax(jnp.where(mask > 0, jnp.arange(T), -1), axis=-1)


def last_token_scores(model, input_ids, attention_mask):
    """[B] float32 raw rewards: the score head at each row's last real token."""
    scores = model(input_ids, attention_mask=attention_mask)  # [B, T] float32
    idx = last_token_index(attention_mask)
    return jnp.take_along_axis(scores, idx[:, None], axis=1)[:, 0]


def pair_scores(model, batch):
    """(r_chosen [B], r_rejected [B]): one forward over the 2B rows."""
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    s = last_token_scores(model, ids, mask)
    B = batch["chosen_ids"].shape[0]
    return s[:B], s[B:]


def pairwise_loss(rc, rr, margin, weight, center_coef: float = 0.0):
    """(weighted loss sum, weight sum, aux sums) for the loop; weight 0 marks filler pairs."""
    d = rc - rr
    per_pair = -jax.nn.log_sigmoid(d - margin)
    if center_coef:
        per_pair = per_pair + center_coef * jnp.square(rc + rr)
    aux = {"accuracy": jnp.sum(weight * (d > 0)), "margin": jnp.sum(weight * d),
           "chosen_score": jnp.sum(weight * rc), "rejected_score": jnp.sum(weight * rr)}
    return jnp.sum(weight * per_pair), jnp.sum(weight), aux


def rm_loss(model, batch, center_coef: float = 0.0):
    rc, rr = pair_scores(model, batch)
    return pairwise_loss(rc, rr, batch["margin"], batch["weight"], center_coef)


def init_score_head(model, seed: int):
    """Score kernel ~ N(0, 1/sqrt(d+1)) (Ziegler et al.; no bias), kept in float32: it is a single
    d-vector and bf16 storage would round its small Adam updates away."""
    k = model.score.kernel
    old = k.get_value()
    d = old.shape[0]
    key = jax.random.fold_in(jax.random.key(seed), 0x5C0)
    w = np.asarray(jax.random.normal(key, old.shape, jnp.float32)) / np.sqrt(d + 1)
    k.set_value(_placed(w, old))


def _placed(value: np.ndarray, like):
    value = jnp.asarray(value, jnp.float32)
    sharding = getattr(like, "sharding", None)
    return jax.device_put(value, sharding) if sharding is not None else value


def score_head_float32(model):
    k = model.score.kernel
    old = k.get_value()
    if old.dtype != jnp.float32:
        k.set_value(_placed(np.asarray(old, np.float32), old))


def score_model_from_lm(lm, *, seed: int | None = None, pad_token_id: int | None = None, copy: bool = False,
                        mesh=None):
    """A head='score' model on `lm`'s backbone (lm_head dropped).  The head is drawn from `seed`
    (init_score_head: a reward model to train) or, with seed None, zero (a value model: the first
    value losses are the returns' scale, not a random head's).  The backbone arrays are shared,
    or copied with `copy` (a critic whose trainables are donated to its update)."""
    mesh = lm.mesh if mesh is None else mesh
    cfg = lm.config if pad_token_id is None else lm.config.replace(pad_token_id=pad_token_id)
    graphdef, state = nnx.split(abstract_model(cfg, head="score", mesh=mesh))
    have = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(lm, nnx.Param))}
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = tuple(map(str, path))
        if key[0] == "score":  # zeros with the right sharding (drawn below for a reward model)
            spec = var.get_value()
            dtype = jnp.float32 if seed is not None else spec.dtype
            val = jnp.zeros(spec.shape, dtype)
            if mesh is not None:
                val = jax.device_put(val, named_sharding(mesh, var.axes, spec.shape))
        else:
            val = have[key].get_value()
            val = jnp.copy(val) if copy else val
        flat.append((path, var.replace(val)))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if seed is not None:
        init_score_head(model, seed)
    return model


def read_norm(run_or_export_dir) -> dict | None:
    f = Path(run_or_export_dir) / NORM_FILE
    return json.loads(f.read_text()) if f.exists() else None


def add_norm_to_export(hf_dir, norm: dict) -> None:
    """reward_norm.json next to the weights and `reward_offset` in config.json (transformers keeps
    unknown config fields as attributes: normalised = logits[:, 0] - config.reward_offset)."""
    if jax.process_index() != 0:
        return
    hf_dir = Path(hf_dir)
    (hf_dir / NORM_FILE).write_text(json.dumps(norm, indent=2) + "\n")
    c = json.loads((hf_dir / "config.json").read_text())
    c["reward_offset"] = norm["offset"]
    write_text_atomic(hf_dir / "config.json", json.dumps(c, indent=2, sort_keys=True) + "\n")

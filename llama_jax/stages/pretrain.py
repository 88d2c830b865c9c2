"""Continued pretraining: packed documents, next-token loss, on the shared loop."""
from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp

from ..data.packing import StepIndexedBatches, pack, tokenize_documents
from ..data.sources import DataError
from ..train.config import ConfigError, load_config, resolve_path, stage_defaults
from ..train.loop import Task
from .common import eval_batches, flops_per_token, next_token, run_stage, text_eval_sets, token_cross_entropy

log = logging.getLogger(__name__)

DEFAULTS = stage_defaults(data={
    "train_files": [], "eval_files": [], "eval_fraction": 0.05, "text_field": "text", "block_size": 512,
    "num_proc": 1, "segment_aware": True, "append_eos": True, "cache_dir": None, "max_documents": None,
    "eval_sets": {},  # {name: [text files]}: each logged as eval_<name>_loss / _ppl / _bpc (forgetting)
})


def lm_loss(model, batch, segment_aware: bool):
    tokens, seg, pos = batch["tokens"], batch["segments"], batch["positions"]
    if segment_aware:
        logits = model(tokens, positions=pos, segment_ids=seg)
    else:
        logits = model(tokens)
    # predict within a document only, never across a boundary, into padding or past the block
    nseg = next_token(seg)
    w = ((nseg == seg) & (nseg > 0)).astype(jnp.float32)
    return token_cross_entropy(logits, next_token(tokens), w)


def make_loss(cfg):
    """The Task's loss_fn(model, batch, rng) -> (loss_sum, weight, aux) for this config."""
    seg_aware = bool(cfg["data"]["segment_aware"])
    return lambda m, b, rng: (*lm_loss(m, b, seg_aware), {})


def batch_spec(cfg, batch: int, seq: int | None = None) -> dict:
    """Shapes and dtypes of a global training batch (what StepIndexedBatches over `pack` yields)."""
    T = int(seq or cfg["data"]["block_size"])
    return {k: jax.ShapeDtypeStruct((batch, T), jnp.int32) for k in ("tokens", "segments", "positions")}


def build_task(cfg, tok, model, run_dir: Path):
    dc, tc = cfg["data"], cfg["train"]
    T = int(dc["block_size"])
    if T > model.config.max_position_embeddings:
        raise ConfigError(f"data.block_size={T} exceeds the model's max_position_embeddings="
                          f"{model.config.max_position_embeddings}")
    files = [resolve_path(cfg, f) for f in (dc["train_files"] if isinstance(dc["train_files"], list) else [dc["train_files"]])]
    if not files:
        raise ConfigError("data.train_files: no training data given")
    cache = resolve_path(cfg, dc["cache_dir"]) or str(run_dir / "cache")
    docs = tokenize_documents(tok, files, dc["text_field"], int(dc["num_proc"]), cache)
    if dc["max_documents"]:
        docs = docs[: int(dc["max_documents"])]
    bos, eos = getattr(tok, "bos_token_id", None), (getattr(tok, "eos_token_id", None) if dc["append_eos"] else None)
    if dc["eval_files"]:
        eval_docs = tokenize_documents(tok, [resolve_path(cfg, f) for f in dc["eval_files"]], dc["text_field"],
                                       int(dc["num_proc"]), cache)
    else:  # hold out the last documents
        n_eval = max(1, int(len(docs) * float(dc["eval_fraction"])))
        if n_eval >= len(docs):
            raise DataError(f"{files}: {len(docs)} document(s) are too few to hold out an eval set")
        docs, eval_docs = docs[:-n_eval], docs[-n_eval:]
    blocks = pack(docs, T, bos, eos)
    eval_blocks = pack(eval_docs, T, bos, eos)
    G = int(tc["batch_size"])
    if len(blocks) < G:
        raise DataError(f"{files}: only {len(blocks)} blocks of {T} tokens for a batch of {G}")
    batches = StepIndexedBatches(blocks, G, int(tc["seed"]), jax.process_index(), jax.process_count())
    eval_list = eval_batches({"tokens": eval_blocks.tokens, "segments": eval_blocks.segments,
                              "positions": eval_blocks.positions}, G, tc["eval_batches"])
    print(f"pretrain data: {len(docs)} documents -> {len(blocks)} blocks of {T} tokens; "
          f"eval {len(eval_list)} batch(es) of {G}")
    return Task(name="pretrain", loss_fn=make_loss(cfg), train=batches,
                eval_batches=eval_list, flops_per_token=flops_per_token(model.config, T), tokens_per_row=T,
                extra_meta={"blocks": len(blocks)},
                eval_sets=text_eval_sets(cfg, tok, T, G, cache, dc["text_field"]))


def run(config_path, out: str | None = None, overrides=()) -> dict:
    cfg = load_config(DEFAULTS, config_path, list(overrides))
    return run_config(cfg, out)


def run_config(cfg: dict, out: str | None = None) -> dict:
    return run_stage(cfg, out, "pretrain", build_task)

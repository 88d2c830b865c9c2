"""Continued pretraining: packed documents, next-token loss, on the shared loop."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..data.packing import tokenizer_fingerprint
from ..data.shards import (MixtureBatches, PackedView, TokenizeConfig, TokenShards, source_fingerprint,
                           tokenize_corpus, tokenizer_path)
from ..data.sources import DataError, expand
from ..train.config import ConfigError, RunConfig, Section, load_config, opt
from ..train.loop import Task
from ..train.run import barrier
from .supervised import DataFiles, eval_batches, flops_per_token, next_token, run_stage, text_eval_sets, token_cross_entropy

log = logging.getLogger(__name__)


@dataclass
class MixtureSource(Section):
    """One source of a weighted mixture: text files or a token-shards directory."""
    files: list[str] = opt([], "text files (globs allowed)")
    shards: str | None = opt(None, "a `llama-jax data tokenize` directory")
    weight: float = opt(1.0, "sampling weight (rows are drawn in proportion)")
    text_field: str | None = opt(None, "json / jsonl / parquet text field (default: data.text_field)")

    def check(self, where: str = "") -> None:
        if bool(self.files) == bool(self.shards):
            raise ConfigError(f"{where.rstrip('.')}: give exactly one of files and shards")
        if not self.weight > 0:
            raise ConfigError(f"{where}weight: {self.weight} (must be > 0)")


@dataclass
class PretrainData(DataFiles):
    """Text files (or token shards); without eval_files the last data.eval_fraction of the documents
    are held out."""
    text_field: str = opt("text", "the text field of json / jsonl / parquet records")
    block_size: int = opt(512, "tokens per packed row")
    num_proc: int = opt(1, "tokenizer processes")
    segment_aware: bool = opt(True, "attention and positions restart at each document in a row")
    append_eos: bool = opt(True, "EOS after each document")
    cache_dir: str | None = opt(None, "token shards cache (default: RUN_DIR/cache)")
    max_documents: int | None = opt(None, "use at most this many documents per source")
    eval_sets: dict = opt({}, "{name: [text files]}: each logged as eval_<name>_loss / _ppl / _bpc (forgetting)")
    shards: str | None = opt(None, "a `llama-jax data tokenize` directory instead of train_files")
    mixture: list[MixtureSource] = opt([], "weighted sources [{files: [...] | shards: DIR, weight: W, text_field: F}]")
    on_bad_utf8: str = opt("skip", "undecodable bytes in a text file", ("skip", "error"))
    chunk_mb: float = opt(64.0, "tokenisation chunk size (MB of text)")


@dataclass
class PretrainConfig(RunConfig):
    data: PretrainData = field(default_factory=PretrainData, metadata={"doc": "the corpus"})


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


def make_loss(cfg: PretrainConfig):
    """The Task's loss_fn(model, batch, rng) -> (loss_sum, weight, aux) for this config."""
    seg_aware = cfg.data.segment_aware
    return lambda m, b, rng: (*lm_loss(m, b, seg_aware), {})


def batch_spec(cfg: PretrainConfig, batch: int, seq: int | None = None) -> dict:
    """Shapes and dtypes of a global training batch (what MixtureBatches over PackedViews yields)."""
    T = int(seq or cfg.data.block_size)
    return {k: jax.ShapeDtypeStruct((batch, T), jnp.int32) for k in ("tokens", "segments", "positions")}


def build_task(cfg: PretrainConfig, tok, model, run_dir: Path):
    dc, tc = cfg.data, cfg.train
    T = dc.block_size
    if T > model.config.max_position_embeddings:
        raise ConfigError(f"data.block_size={T} exceeds the model's max_position_embeddings="
                          f"{model.config.max_position_embeddings}")
    cache = cfg.path(dc.cache_dir) or str(run_dir / "cache")
    G = tc.batch_size
    bos, eos = getattr(tok, "bos_token_id", None), (getattr(tok, "eos_token_id", None) if dc.append_eos else None)
    if dc.mixture:
        srcs = [(m.shards or m.files, m.weight, m.text_field or dc.text_field) for m in dc.mixture]
    else:
        train = dc.shards or dc.train_files
        if not train:
            raise ConfigError("data.train_files: no training data given")
        srcs = [(train, 1.0, dc.text_field)]
    views, held, names = [], [], []
    for spec, weight, field_ in srcs:
        shards = open_shards(cfg, tok, spec, field_, cache)
        n = shards.num_docs if not dc.max_documents else min(shards.num_docs, dc.max_documents)
        if dc.eval_files:
            n_eval = 0
        else:  # hold out the last documents
            n_eval = max(1, int(n * dc.eval_fraction))
            if n_eval >= n:
                raise DataError(f"{spec}: {n} document(s) are too few to hold out an eval set")
            held.append(PackedView(shards, T, bos, eos, n - n_eval, n))
        views.append((PackedView(shards, T, bos, eos, 0, n - n_eval), weight))
        names.append(f"{shards.path.name}: {n - n_eval} docs -> {len(views[-1][0])} blocks")
        if len(views[-1][0]) < G and len(srcs) == 1:
            raise DataError(f"{spec}: only {len(views[-1][0])} blocks of {T} tokens for a batch of {G}")
    if dc.eval_files:
        ev = open_shards(cfg, tok, dc.eval_files, dc.text_field, cache)
        held = [PackedView(ev, T, bos, eos)]
    # eval: the leading rows of each held-out view, up to eval_batches global batches in all
    want = (tc.eval_batches * G) if tc.eval_batches is not None else sum(len(v) for v in held)
    parts = []
    for v in held:
        k = min(len(v), want - sum(len(p["tokens"]) for p in parts))
        if k > 0:
            parts.append(v.rows(range(k)))
    batches = MixtureBatches(views, G, tc.seed, jax.process_index(), jax.process_count())
    eval_list = eval_batches({key: np.concatenate([p[key] for p in parts]) for key in parts[0]}, G,
                             tc.eval_batches) if parts else []
    blocks = sum(len(v) for v, _ in views)
    print(f"pretrain data: {'; '.join(names)}; eval {len(eval_list)} batch(es) of {G}")
    return Task(name="pretrain", loss_fn=make_loss(cfg), train=batches,
                eval_batches=eval_list, flops_per_token=flops_per_token(model.config, T), tokens_per_row=T,
                extra_meta={"blocks": blocks},
                eval_sets=text_eval_sets(cfg, tok, T, G, cache, dc.text_field))


def open_shards(cfg: PretrainConfig, tok, spec, text_field: str, cache: str) -> TokenShards:
    """Token shards for `spec`: a `llama-jax data tokenize` directory (checked against the run's
    tokenizer), or text files tokenised once into `cache`/shards-<key> (resumable, reused)."""
    specs = cfg.paths(spec if isinstance(spec, list) else [spec])
    if len(specs) == 1 and os.path.isdir(specs[0]):
        return TokenShards(specs[0], tok)
    files = expand(specs)
    for f in files:
        if not os.path.isfile(f):
            raise DataError(f"{f}: data file not found")
    dc = cfg.data
    key = hashlib.sha256(json.dumps([[source_fingerprint(f) for f in files], tokenizer_fingerprint(tok), text_field,
                                     float(dc.chunk_mb), dc.on_bad_utf8]).encode()).hexdigest()[:16]
    out = Path(cache) / f"shards-{key}"
    if jax.process_index() == 0:
        tokenize_corpus(files, tokenizer_path(tok), out, TokenizeConfig(
            text_field=text_field, num_proc=dc.num_proc, chunk_mb=dc.chunk_mb,
            on_bad_utf8=dc.on_bad_utf8), progress=cfg.train.progress)
    # the other hosts wait for process 0's shards (a shared filesystem is assumed, as for checkpoints);
    # a barrier rather than polling for the manifest: if process 0 fails, the coordinator ends the wait
    barrier(f"token shards {out.name}")
    return TokenShards(out, tok)


def run(config_path, out: str | None = None, overrides=()) -> dict:
    return run_config(load_config(PretrainConfig, config_path, list(overrides)), out)


def run_config(cfg: PretrainConfig, out: str | None = None) -> dict:
    return run_stage(cfg, out, "pretrain", build_task)

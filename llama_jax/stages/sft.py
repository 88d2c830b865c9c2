"""Supervised fine-tuning: chat templates, loss on assistant turns + EOS, on the shared loop.

Batches are packed (several conversations per row, segment-masked attention, the default) or
length-bucketed, so padding does not eat the compute.  At each eval the model also answers a few
prompts; the answers go to `samples.jsonl` in the run directory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..data.packing import StepIndexedBatches, StepIndexedList
from ..data.records import USER, Conversation
from ..data.sft_examples import IGNORE_INDEX, bucket_batches, load_sft, pack_examples, padding_fraction
from ..data.sources import DataError, expand
from ..data.templates import generation_prompt_ids, get_template
from ..generate import generate
from ..train.config import ConfigError, RunConfig, load_config, opt
from ..train.loop import Task
from .supervised import ChatFiles, eval_batches, flops_per_token, next_token, run_stage, text_eval_sets, token_cross_entropy
from .pretrain import lm_loss

@dataclass
class SFTData(ChatFiles):
    """Alpaca / sharegpt / messages records; without eval_files the last data.eval_fraction of the
    examples are held out."""
    batching: str = opt("auto", "pack: several conversations per row; bucket: length buckets; pad: to max_length; "
                        "auto: bucket on GPU (cuDNN flash takes right padding), pack elsewhere",
                        ("auto", "pack", "bucket", "pad"))
    sample_prompts: list[str] = opt(["请介绍一下中国的首都。", "用一句话解释什么是机器学习。"],
                                    "answered at each eval (RUN_DIR/samples.jsonl)")
    sample_max_new_tokens: int = opt(64, "tokens per sample answer")
    eval_sets: dict = opt({}, "{name: [text files]}: language-modelling loss / ppl / bits per char of each (forgetting)")


@dataclass
class SFTConfig(RunConfig):
    data: SFTData = field(default_factory=SFTData, metadata={"doc": "the chat data"})


def sft_loss(model, batch):
    """Mean cross entropy over labelled positions (labels -100 elsewhere), HF's convention."""
    tokens, labels = batch["tokens"], batch["labels"]
    if "segments" in batch:
        logits = model(tokens, positions=batch["positions"], segment_ids=batch["segments"])
    else:
        logits = model(tokens, attention_mask=batch["attention_mask"], right_padded=True)  # bucket_batches pads right
    targets = next_token(labels, IGNORE_INDEX)
    w = (targets != IGNORE_INDEX).astype(jnp.float32)
    return token_cross_entropy(logits, jnp.where(targets == IGNORE_INDEX, 0, targets), w)


def make_loss(cfg: SFTConfig):
    """The Task's loss_fn(model, batch, rng) -> (loss_sum, weight, aux)."""
    return lambda m, b, rng: (*sft_loss(m, b), {})


def batching_mode(batching: str, platform: str | None = None) -> str:
    """data.batching with `auto` resolved for the platform: on GPU `bucket` (right-padded length
    buckets reach cuDNN's flash kernel as sequence lengths; packed rows, which need segment masks,
    would take XLA's dense-mask attention), elsewhere `pack` (TPU: splash takes the segment ids;
    CPU: one dense mask either way, and packing wastes no tokens)."""
    if batching != "auto":
        return batching
    return "bucket" if (platform or jax.default_backend()) in ("gpu", "cuda") else "pack"


def batch_spec(cfg: SFTConfig, batch: int, seq: int | None = None) -> dict:
    """Shapes and dtypes of a global training batch: packed rows (data.batching=pack) or padded
    rows with an attention mask (bucket / pad, at their longest length)."""
    T = int(seq or cfg.data.max_length)
    keys = (("tokens", "labels", "segments", "positions") if batching_mode(cfg.data.batching) == "pack"
            else ("tokens", "labels", "attention_mask"))
    return {k: jax.ShapeDtypeStruct((batch, T), jnp.int32) for k in keys}


def _rows(examples, batching: str, max_length: int, G, seed, pad_id):
    if batching == "pack":
        rows = pack_examples(examples, max_length, pad_id)
        return rows, padding_fraction(rows)
    if batching in ("bucket", "pad"):
        # "pad" = the naive baseline: every batch padded to max_length (for benchmarks)
        multiple = max_length if batching == "pad" else 64
        bs = bucket_batches(examples, G, seed, multiple=multiple, pad_id=pad_id, drop_last=True)
        for b in bs:
            b["attention_mask"] = (b.pop("segments") > 0).astype(np.int32)
            b.pop("positions", None)
        return bs, padding_fraction([{"segments": b["attention_mask"]} for b in bs])
    raise ConfigError(f"data.batching: {batching!r} is not 'pack', 'bucket' or 'pad'")


def build_task(cfg: SFTConfig, tok, model, run_dir: Path):
    dc, tc = cfg.data, cfg.train
    T = dc.max_length
    if T > model.config.max_position_embeddings:
        raise ConfigError(f"data.max_length={T} exceeds the model's max_position_embeddings="
                          f"{model.config.max_position_embeddings}")
    template = get_template(dc.template)
    files = expand(cfg.paths(dc.train_files))
    examples, stats = load_sft(files, tok, template, T, dc.on_error)
    print(f"sft data: {stats.report()}")
    if dc.eval_files:
        eval_examples, _ = load_sft(expand(cfg.paths(dc.eval_files)), tok, template, T, dc.on_error)
    else:
        n_eval = max(1, int(len(examples) * dc.eval_fraction))
        if n_eval >= len(examples):
            raise DataError(f"{files}: {len(examples)} usable example(s) are too few to hold out an eval set")
        examples, eval_examples = examples[:-n_eval], examples[-n_eval:]
    G, seed = tc.batch_size, tc.seed
    pad = getattr(tok, "pad_token_id", None) or 0
    host, nh = jax.process_index(), jax.process_count()
    batching = batching_mode(dc.batching)
    rows, pad_frac = _rows(examples, batching, T, G, seed, pad)
    if batching == "pack":
        if len(rows["tokens"]) < G:
            raise DataError(f"{files}: {len(rows['tokens'])} packed rows for a batch of {G}")
        train_batches = StepIndexedBatches(rows, G, seed, host, nh)
    else:
        train_batches = StepIndexedList(rows, seed, host, nh)
    ev_rows, _ = _rows(eval_examples, "pack", T, G, seed, pad)
    eval_list = eval_batches(ev_rows, G, tc.eval_batches)
    print(f"sft batches: {batching}, padding {pad_frac:.1%} of tokens; eval {len(eval_list)} batch(es)")
    prompts = _sample_prompts(dc, template, tok)
    samples_path = run_dir / "samples.jsonl"

    def samples(m, step):
        if not prompts or jax.process_index() != 0:
            return {}
        m.eval()
        outs = generate(m, [p for _, p in prompts], max_new_tokens=dc.sample_max_new_tokens, temperature=0.0)
        with open(samples_path, "a") as f:
            for (q, _), o in zip(prompts, outs):
                f.write(json.dumps({"step": step, "prompt": q, "response": tok.decode(o, skip_special_tokens=True)},
                                   ensure_ascii=False) + "\n")
        return {}

    real = (rows["segments"] > 0).sum() / len(rows["segments"]) * G if isinstance(rows, dict) else \
        np.mean([b["attention_mask"].sum() for b in rows])
    return Task(name="sft", loss_fn=make_loss(cfg), train=train_batches,
                eval_batches=eval_list, eval_fn=samples, flops_per_token=flops_per_token(model.config, T),
                tokens_per_row=T if batching == "pack" else 0,
                eval_sets=text_eval_sets(cfg, tok, T, G, str(run_dir / "cache"), loss_fn=_text_lm_loss),
                extra_meta={"padding_fraction": pad_frac, "real_tokens_per_batch": float(real), **{k: int(v) for k, v in stats.counts.items()}})


def _text_lm_loss(m, b, rng):
    """Next-token loss on packed text rows (data.eval_sets), as in pretraining."""
    return (*lm_loss(m, b, True), {})


def _sample_prompts(dc, template, tok):
    out = []
    for q in dc.sample_prompts:
        out.append((q, generation_prompt_ids(Conversation(None, [(USER, q)]), tok, template)))
    return out


def run(config_path, out: str | None = None, overrides=()) -> dict:
    return run_config(load_config(SFTConfig, config_path, list(overrides)), out)


def run_config(cfg: SFTConfig, out: str | None = None) -> dict:
    return run_stage(cfg, out, "sft", build_task)

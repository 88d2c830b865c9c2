"""Reward model (Bradley–Terry) on preference pairs, on the shared loop: `llama-jax rm CONFIG`.

The model, its scores and loss are `rl.reward_model`'s; the pairs and their batches
`data.reward_pairs`'.  This stage builds the score-head model for any model.init (a preset, an HF
causal LM converted once, an HF sequence classifier or a llama_jax checkpoint) with a dedicated
PAD id (never EOS: an RM that sees EOS as padding teaches a policy never to stop), trains it on the
shared loop, then writes the normalisation offset (`reward_norm.json`: the mean raw score of
reference responses; a normalised reward is `score − offset`) and, with rm.export_dir, exports it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import PRESETS, LlamaConfig, preset
from ..data.sft_examples import load_sft
from ..data.packing import StepIndexedBatches
from ..data.reward_pairs import collate, load_rm_pairs, pair_eval_batches
from ..data.sources import DataError
from ..export import export as export_run
from ..hf import save_hf
from ..rl.reward_model import (NORM_FILE, add_norm_to_export, init_score_head, last_token_scores, read_norm,
                               rm_loss, score_head_float32, score_model_from_lm)
from ..sharding import host_batch_to_global
from ..train.config import ConfigError, RunConfig, Section, TrainSection, load_config, opt
from ..train.loop import Task, train
from ..train.run import barrier, build_mesh, build_model, build_tokenizer, check_vocab, is_primary, tokenizer_path, \
    trainable_filter
from .supervised import PairData

log = logging.getLogger(__name__)

INIT_DIR = "init_score"  # HF causal-LM init converted once to a score-head checkpoint (see _score_init_dir)


@dataclass
class RMData(PairData):
    """Preference pairs (a seeded random data.eval_fraction held out when there are no eval_files)."""
    pad_id: int | None = opt(None, "PAD id (never EOS; default: the model's pad_token_id, else the tokenizer's)")
    pad_to_multiple: int = opt(64, "batch width rounded up to a multiple of this (fewer compiled shapes)")
    margin_field: str | None = opt("margin", "record field with a per-pair margin (absent: 0)")
    max_pairs: int | None = opt(None, "use at most this many training pairs")
    epochs: float = opt(1.0, "passes over the pairs when train.steps is null")


@dataclass
class RMOptions(Section):
    center_coef: float = opt(0.0, "center_coef x (r_chosen + r_rejected)^2 keeps raw scores near 0")
    norm_files: list[str] = opt([], "chat records whose replies define the offset (default: the chosen responses)")
    norm_samples: int = opt(512, "reference responses scored for the offset")
    export_dir: str | None = opt(None, "also export the trained RM (HF LlamaForSequenceClassification) here")


@dataclass
class RMConfig(RunConfig):
    data: RMData = field(default_factory=RMData, metadata={"doc": "preference pairs"})
    rm: RMOptions = field(default_factory=RMOptions, metadata={"doc": "loss and normalisation"})
    # one epoch (steps=null: derived from data.epochs), lr decayed to 0, all held-out pairs evaluated
    train: TrainSection = field(default_factory=lambda: TrainSection(steps=None, min_lr_ratio=0.0, eval_batches=None),
                                metadata={"doc": "optimizer, schedule, logging"})
    steps_required = False


# ----------------------------------------------------------------------------- model
def _init_kind(path: Path) -> str:
    """'score' or 'lm': the head stored at an HF dir / llama_jax checkpoint."""
    if (path / "llama_jax.json").exists():
        return json.loads((path / "llama_jax.json").read_text()).get("head", "lm")
    cfg = path / "config.json"
    if not cfg.exists():
        raise ConfigError(f"model.init: {path} has no config.json")
    archs = json.loads(cfg.read_text()).get("architectures") or []
    return "score" if "LlamaForSequenceClassification" in archs else "lm"


def _score_init_dir(cfg, mesh, tok_path, pad: int, run_dir: Path) -> Path:
    """An HF causal LM cannot be loaded as head='score' (its lm_head is unused, score missing), and
    `llama-jax export` rebuilds the model from the run config's model.init.  So the first run
    writes the backbone + a fresh score head (+ pad id) once as an HF LlamaForSequenceClassification
    directory in the run dir; the run config points at it, and resume / export start from exactly
    the same weights.  Cost: one copy of the base model on disk."""
    out = run_dir / INIT_DIR
    src = str(Path(cfg.path(cfg.model.init)).absolute())
    source = {"converted_from": src, "seed": cfg.train.seed, "pad_token_id": pad}
    if (out / "config.json").exists():  # a resumed run: the same conversion, or a clear error
        have = json.loads((out / "rm_source.json").read_text()) if (out / "rm_source.json").exists() else {}
        if have != source:
            raise ConfigError(f"{out} was converted from {have or 'an unknown source'}, not {source}: "
                              "use a new --out for a different model.init / seed / pad")
        return out
    lm = build_model(cfg, mesh, vocab_size=None, head="lm")
    model = score_model_from_lm(lm, seed=source["seed"], pad_token_id=pad)
    del lm
    dtype = jnp.dtype(model.embed_tokens.embedding.get_value().dtype).name
    save_hf(model, out, tokenizer=tok_path, dtype=dtype)
    if is_primary():
        (out / "rm_source.json").write_text(json.dumps(source, indent=2) + "\n")
    barrier("rm_init_score")  # the others read it next: wait for process 0's writes
    return out


def _tok_pad(tok):
    pad = getattr(tok, "pad_token_id", None)
    eos = getattr(tok, "eos_token_id", None)
    return None if pad is None or pad == eos else int(pad)


def _target_config(cfg, tok):
    """The model config model.init will give (read from config.json: no weights loaded), and the
    init's head ('score' / 'lm', None for a preset)."""
    mc = cfg.model
    if mc.init in PRESETS:
        over = dict(mc.overrides)
        over.setdefault("vocab_size", len(tok))
        return preset(mc.init, **over), None
    path = Path(cfg.path(mc.init))
    if not path.exists():
        raise ConfigError(f"model.init: {path} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    return LlamaConfig.from_json_file(path / "config.json"), _init_kind(path)


def resolve_pad(cfg, tok) -> int:
    """data.pad_id, else the model's pad_token_id, else the tokenizer's pad (never EOS); checked
    against EOS and the vocab before any weights are built."""
    c, kind = _target_config(cfg, tok)
    pad = cfg.data.pad_id
    if pad is None:
        pad = c.pad_token_id if c.pad_token_id is not None else _tok_pad(tok)
    if pad is None:
        raise ConfigError("data.pad_id: no PAD id (the tokenizer has none, or only EOS); set a dedicated one, "
                          "e.g. 32000 with model.overrides.vocab_size >= 32001")
    pad = int(pad)
    eos = set(c.eos_token_ids) | ({tok.eos_token_id} if getattr(tok, "eos_token_id", None) is not None else set())
    if pad in eos:
        raise ConfigError(f"data.pad_id={pad} is EOS: the reward model scores the EOS token; use a dedicated PAD")
    if not 0 <= pad < c.vocab_size:
        raise ConfigError(f"data.pad_id={pad} is outside the model's vocab_size={c.vocab_size} "
                          "(grow it: model.overrides.vocab_size for presets, llama-jax resize for checkpoints)")
    # an HF causal LM is converted below with this pad written into its config; otherwise they must agree
    if c.pad_token_id is not None and c.pad_token_id != pad and kind != "lm":
        raise ConfigError(f"data.pad_id={pad} differs from the model's pad_token_id={c.pad_token_id}: HF sequence "
                          "classification pools the last token that is not pad_token_id, so they must agree")
    if c.pad_token_id is None and kind == "score":
        log.warning("%s has no pad_token_id: its HF export cannot find the last token of padded rows",
                    cfg.model.init)
    return pad


def build_rm_model(cfg: RMConfig, mesh, tok, run_dir: Path):
    """(the config that rebuilds this model, the score-head model, the PAD id) for model.init (a
    preset / HF causal LM / HF seq-cls / llama_jax checkpoint).  The returned config names what was
    resolved (model.overrides.pad_token_id, the converted model.init and its tokenizer), so the
    stored run config rebuilds the same model for resume and export."""
    mc = cfg.model
    pad = resolve_pad(cfg, tok)
    if mc.init in PRESETS:
        # the exported config.json must name the pad
        cfg = cfg.replace(model=mc.replace(overrides={"pad_token_id": pad, **mc.overrides}))
        model = build_model(cfg, mesh, vocab_size=len(tok), head="score")
        init_score_head(model, cfg.train.seed)
    else:
        if _init_kind(Path(cfg.path(mc.init))) == "lm":
            tok_path = tokenizer_path(cfg)
            conv = _score_init_dir(cfg, mesh, tok_path, pad, run_dir)
            # keep the tokenizer when model.init moves to the converted dir
            cfg = cfg.with_model(str(conv)).replace(tokenizer=tok_path)
        model = build_model(cfg, mesh, vocab_size=None, head="score")
    score_head_float32(model)
    return cfg, model, pad


# ----------------------------------------------------------------------------- normalisation
def score_sequences(model, seqs: list[np.ndarray], pad_id: int, G: int, mesh, multiple: int = 64) -> np.ndarray:
    """Raw rewards of token sequences (each ends with its EOS), in global batches of G rows."""
    model.eval()
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, ids, mask: last_token_scores(nnx.merge(graphdef, st), ids, mask))
    host, nh = jax.process_index(), jax.process_count()
    per = G // nh
    out = []
    for b0 in range(0, len(seqs), G):
        chunk = list(seqs[b0:b0 + G])
        n = len(chunk)
        chunk += [chunk[0]] * (G - n)
        T = -(-max(len(s) for s in chunk) // multiple) * multiple
        ids = np.full((G, T), pad_id, np.int32)
        mask = np.zeros((G, T), np.int32)
        for i, s in enumerate(chunk):
            ids[i, :len(s)], mask[i, :len(s)] = s, 1
        g = host_batch_to_global({"ids": ids[host * per:(host + 1) * per], "mask": mask[host * per:(host + 1) * per]}, mesh)
        s = fn(state, g["ids"], g["mask"])
        if nh > 1:
            from jax.experimental import multihost_utils

            s = multihost_utils.process_allgather(s, tiled=True)
        out.append(np.asarray(s)[:n])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def reference_sequences(cfg: RMConfig, tok, train_pairs) -> tuple[list[np.ndarray], str]:
    """What the offset is the mean score of: rm.norm_files (chat records ending in an assistant
    reply, e.g. SFT-policy samples, same template) or the training pairs' chosen responses."""
    dc, rc = cfg.data, cfg.rm
    files = rc.norm_files
    n = rc.norm_samples
    if files:
        exs, _ = load_sft(cfg.paths(files), tok, dc.template, dc.max_length, dc.on_error)
        seqs, source = [e.input_ids for e in exs], ",".join(map(str, files))
    else:
        seqs, source = [np.concatenate([p.prompt_ids, p.chosen_ids]) for p in train_pairs], "train_chosen"
    if len(seqs) > n:  # a fixed sample: the offset is a function of the config
        idx = np.sort(np.random.default_rng([cfg.train.seed, 7]).permutation(len(seqs))[:n])
        seqs = [seqs[i] for i in idx]
    return seqs, source


def export(run_dir, out, step: int | None = None) -> Path:
    """`llama-jax export` of an RM run + the normalisation offset (when it belongs to that step)."""
    out = export_run(run_dir, out, step=step)
    norm = read_norm(run_dir)
    if norm is not None and (step is None or step == norm.get("step")):
        add_norm_to_export(out, norm)
    return Path(out)


# ----------------------------------------------------------------------------- stage
def build_task(cfg: RMConfig, tok, model, pad: int):
    """(the Task, the training pairs, the number of steps: train.steps or data.epochs over the pairs)."""
    dc, tc, rc = cfg.data, cfg.train, cfg.rm
    T = dc.max_length
    if T > model.config.max_position_embeddings:
        raise ConfigError(f"data.max_length={T} exceeds the model's max_position_embeddings="
                          f"{model.config.max_position_embeddings}")
    files = cfg.paths(dc.train_files)
    if not files:
        raise ConfigError("data.train_files: no training data given")
    load = lambda fs: load_rm_pairs(fs, tok, dc.template, T, dc.max_prompt_length, dc.margin_field,  # noqa: E731
                                    dc.on_error)
    pairs, margins, stats = load(files)
    print(f"rm data: {stats.report()}")
    seed = tc.seed
    if dc.max_pairs:
        pairs, margins = pairs[: dc.max_pairs], margins[: dc.max_pairs]
    if dc.eval_files:
        ev_pairs, ev_margins, _ = load(cfg.paths(dc.eval_files))
    else:  # a seeded random hold-out: the files are concatenated, so "the last n" is one source only
        n_eval = max(1, int(round(len(pairs) * dc.eval_fraction)))
        if n_eval >= len(pairs):
            raise DataError(f"{files}: {len(pairs)} pair(s) are too few to hold out an eval set")
        perm = np.random.default_rng([seed, 1]).permutation(len(pairs))
        ev_idx, tr_idx = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
        ev_pairs, ev_margins = [pairs[i] for i in ev_idx], margins[ev_idx]
        pairs, margins = [pairs[i] for i in tr_idx], margins[tr_idx]
    bad = [i for i, p in enumerate(pairs + ev_pairs)
           if pad in p.prompt_ids or pad in p.chosen_ids or pad in p.rejected_ids]
    if bad:  # HF pools the last token != pad_token_id: a real PAD token would move the score
        raise DataError(f"data.pad_id={pad} occurs in the text of {len(bad)} pair(s); choose an id the tokenizer "
                        "never produces")
    G = tc.batch_size
    if len(pairs) < G:
        raise DataError(f"{files}: only {len(pairs)} training pairs for a batch of {G}")
    steps = tc.steps if tc.steps is not None else max(1, int(dc.epochs * len(pairs)) // G)
    host, nh = jax.process_index(), jax.process_count()
    mult = dc.pad_to_multiple
    ones = np.ones(G)
    batches = StepIndexedBatches(pairs, G, seed, host, nh,
                                 collate=lambda idx: collate([pairs[i] for i in idx], margins[idx], ones, pad, mult))
    ev = pair_eval_batches(ev_pairs, ev_margins, G, pad, mult, host, nh, tc.eval_batches) if tc.eval_every else []
    # throughput in real tokens: "rows" of the loop are pairs here, tokens per pair on average
    per_pair = float(np.mean([2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]))
    c = model.config
    head_free = c.num_params(include_embeddings=False) - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
    fpt = 6.0 * head_free + 12.0 * c.num_hidden_layers * c.hidden_size * per_pair / 2
    coef = rc.center_coef
    print(f"rm data: {len(pairs)} training pairs, {len(ev_pairs)} held out; {steps} steps of {G} pairs "
          f"({steps * G / len(pairs):.2f} epochs); pad id {pad}")
    task = Task(name="rm", loss_fn=lambda m, b, rng: rm_loss(m, b, coef), train=batches, eval_batches=ev,
                flops_per_token=fpt, tokens_per_row=int(round(per_pair)),
                extra_meta={"pairs": len(pairs), "eval_pairs": len(ev_pairs)}, perplexity=False)
    return task, pairs, steps


def run(config_path, out: str | None = None, overrides=()) -> dict:
    return run_config(load_config(RMConfig, config_path, list(overrides)), out)


def run_config(cfg: RMConfig, out: str | None = None) -> dict:
    run_dir = Path(out).absolute() if out else cfg.default_run_dir("rm")
    mesh = build_mesh(cfg)
    tok = build_tokenizer(cfg)
    cfg, model, pad = build_rm_model(cfg, mesh, tok, run_dir)
    check_vocab(tok, model)
    task, train_pairs, steps = build_task(cfg, tok, model, pad)
    lc = cfg.lora
    if lc.enabled and "score" not in lc.trainable_modules:
        # the head is new: LoRA alone would leave it at its random init
        cfg = cfg.replace(lora=lc.replace(trainable_modules=list(lc.trainable_modules) + ["score"]))
    cfg = cfg.replace(train=cfg.train.replace(steps=steps))
    trainable = trainable_filter(cfg, model)
    result = train(task, model, cfg, run_dir, mesh, trainable=trainable, head="score")

    seqs, source = reference_sequences(cfg, tok, train_pairs)
    raw = score_sequences(model, seqs, pad, cfg.train.batch_size, mesh, cfg.data.pad_to_multiple)
    norm = {"offset": float(np.mean(raw)), "std": float(np.std(raw)), "count": int(len(raw)), "source": source,
            "step": steps, "pad_token_id": pad,
            "usage": "normalised reward = raw score - offset (raw score: score head at the last real token)"}
    if is_primary():
        (run_dir / NORM_FILE).write_text(json.dumps(norm, indent=2) + "\n")
    print(f"rm: reward offset {norm['offset']:.4f} (std {norm['std']:.4f}) over {len(raw)} reference responses")
    result.update(run_dir=str(run_dir), model=model, pad_id=pad, reward_norm=norm)
    if cfg.rm.export_dir:
        out_dir = Path(cfg.path(cfg.rm.export_dir))
        result["export_dir"] = str(export(run_dir, out_dir))
        print(f"rm: exported to {out_dir}")
    return result

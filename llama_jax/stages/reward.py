"""Reward model (Bradley–Terry) on preference pairs, on the shared loop.

The model is the Llama backbone with the bias-free scalar head (`Llama(head="score")`, HF
LlamaForSequenceClassification with num_labels=1).  A sequence's reward is the head's output at
its last real token, i.e. the EOS closing `prompt + response + EOS`; the last real token is found
from the attention mask, so left and right padding give the same score.  Padding uses a dedicated
PAD id, never EOS (an RM that sees EOS as padding teaches a policy never to stop).

Loss per pair: -log σ(r_c − r_r − margin) + center_coef · (r_c + r_r)²; accuracy P(r_c > r_r) and
the mean margin r_c − r_r are logged (train and held-out) through the loop's aux sums.  After
training the mean raw score of reference responses is written to `reward_norm.json`; a
normalised reward is `score − offset` (a bias-free head cannot absorb a constant).
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import PRESETS
from ..data.preference import PairExample, encode_pair, pair_batch, to_preference
from ..data.records import RecordError, Stats, iter_records
from ..data.sft_examples import load_sft
from ..data.sources import DataError
from ..data.templates import get_template
from ..train.config import ConfigError, load_config, resolve_path, stage_defaults
from ..train.loop import Task, _to_global, train
from .common import build_mesh, build_model, build_tokenizer, check_vocab

log = logging.getLogger(__name__)

NORM_FILE = "reward_norm.json"
INIT_DIR = "init_score"  # HF causal-LM init converted once to a score-head checkpoint (see _score_init_dir)

DEFAULTS = stage_defaults(
    data={
        "train_files": [], "eval_files": [], "eval_fraction": 0.1, "template": "chinese-alpaca-2",
        "max_length": 512, "max_prompt_length": None, "pad_id": None, "pad_to_multiple": 64,
        "margin_field": "margin", "on_error": "skip", "max_pairs": None, "epochs": 1.0,
    },
    rm={"center_coef": 0.0, "norm_files": [], "norm_samples": 512, "export_dir": None},
    # one epoch (steps=null: derived from data.epochs), lr decayed to 0, all held-out pairs evaluated
    train={"steps": None, "min_lr_ratio": 0.0, "eval_batches": None},
)


# ----------------------------------------------------------------------------- scores and loss
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


# ----------------------------------------------------------------------------- data
def load_rm_pairs(paths, tok, template, max_length, max_prompt_length=None, margin_field="margin",
                  on_error="skip") -> tuple[list[PairExample], np.ndarray, Stats]:
    """Encoded pairs plus each pair's margin (record field `margin_field`, 0 when absent)."""
    template = get_template(template)
    stats = Stats()

    def parse(rec, stats, source):
        pref = to_preference(rec, stats, source)
        m = rec.get(margin_field) if margin_field else None
        if m is None:
            return pref, 0.0
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise RecordError("bad_margin", margin_field, f"{m!r} is not a finite number")
        return pref, float(m)

    pairs, margins = [], []
    for source, (pref, m) in iter_records(paths, parse, stats, on_error):
        pair = encode_pair(pref, tok, template, max_length, max_prompt_length, stats, source)
        if pair is not None:
            pairs.append(pair)
            margins.append(m)
            stats.add("pairs", source=source)
    if not stats["records"]:
        raise DataError("no records to load")
    return pairs, np.asarray(margins, np.float32), stats


def collate(pairs, margins, weights, pad_id: int, multiple: int = 1) -> dict[str, np.ndarray]:
    """[B, T] right-padded chosen / rejected rows (one T for both) + margin and weight [B]."""
    b = pair_batch(pairs, pad_id, multiple)
    B = len(pairs)
    return {"chosen_ids": b["input_ids"][:B], "chosen_mask": b["attention_mask"][:B],
            "rejected_ids": b["input_ids"][B:], "rejected_mask": b["attention_mask"][B:],
            "margin": np.asarray(margins, np.float32), "weight": np.asarray(weights, np.float32)}


class PairBatches:
    """Batch for step s = pairs s*G .. s*G+G-1 of per-epoch seeded permutations (a function of s,
    so resume is exact).  T is set by the whole global batch so every host builds the same shape;
    each host returns its contiguous slice of the pairs."""

    def __init__(self, pairs, margins, G, seed, pad_id, multiple, host=0, num_hosts=1):
        if G % num_hosts:
            raise DataError(f"global batch {G} is not divisible by {num_hosts} hosts")
        self.pairs, self.margins, self.G, self.seed = pairs, margins, G, seed
        self.pad_id, self.multiple, self.host, self.num_hosts = pad_id, multiple, host, num_hosts
        self._perm = (None, None)

    def perm(self, epoch):
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs)))
        return self._perm[1]

    def rows(self, step):
        n = len(self.pairs)
        return np.array([self.perm(i // n)[i % n] for i in range(step * self.G, (step + 1) * self.G)])

    def batch(self, step):
        r = self.rows(step)
        b = collate([self.pairs[i] for i in r], self.margins[r], np.ones(len(r)), self.pad_id, self.multiple)
        per = self.G // self.num_hosts
        return {k: v[self.host * per:(self.host + 1) * per] for k, v in b.items()}


def eval_batches(pairs, margins, G, pad_id, multiple, host=0, num_hosts=1, limit=None):
    """Every held-out pair in global batches of G; the last is filled with weight-0 copies."""
    out = []
    per = G // num_hosts
    for b0 in range(0, len(pairs), G):
        if limit is not None and len(out) >= limit:
            break
        idx = list(range(b0, min(b0 + G, len(pairs))))
        w = [1.0] * len(idx) + [0.0] * (G - len(idx))
        idx += [idx[0]] * (G - len(idx))
        b = collate([pairs[i] for i in idx], margins[idx], w, pad_id, multiple)
        out.append({k: v[host * per:(host + 1) * per] for k, v in b.items()})
    return out


# ----------------------------------------------------------------------------- model
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


def lm_to_score(lm, seed: int, pad_token_id: int | None = None):
    """A score-head model sharing `lm`'s backbone arrays (lm_head dropped, head freshly drawn)."""
    from ..model import abstract_model

    cfg = lm.config if pad_token_id is None else lm.config.replace(pad_token_id=pad_token_id)
    graphdef, state = nnx.split(abstract_model(cfg, head="score", mesh=lm.mesh))
    have = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(lm, nnx.Param))}
    flat = []
    for path, var in nnx.to_flat_state(state):
        key = tuple(map(str, path))
        if key[0] == "score":  # placeholder with the right sharding; drawn below
            spec = var.get_value()
            if lm.mesh is not None:
                from ..sharding import named_sharding

                val = jax.device_put(np.zeros(spec.shape, np.float32), named_sharding(lm.mesh, var.axes, spec.shape))
            else:
                val = jnp.zeros(spec.shape, jnp.float32)
            flat.append((path, var.replace(val)))
        else:
            flat.append((path, var.replace(have[key].get_value())))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    init_score_head(model, seed)
    return model


def _init_kind(path: Path) -> str:
    """'score' or 'lm': the head stored at an HF dir / llama_jax checkpoint."""
    if (path / "llama_jax.json").exists():
        return json.loads((path / "llama_jax.json").read_text()).get("head", "lm")
    cfg = path / "config.json"
    if not cfg.exists():
        raise ConfigError(f"model.init: {path} has no config.json")
    archs = json.loads(cfg.read_text()).get("architectures") or []
    return "score" if "LlamaForSequenceClassification" in archs else "lm"


def _is_primary() -> bool:
    return jax.process_index() == 0


def _score_init_dir(cfg, mesh, tok_path, pad: int, run_dir: Path) -> Path:
    """An HF causal LM cannot be loaded as head='score' (its lm_head is unused, score missing), and
    `llama-jax export` rebuilds the model from the run config's model.init.  So the first run
    writes the backbone + a fresh score head (+ pad id) once as an HF LlamaForSequenceClassification
    directory in the run dir; the run config points at it, and resume / export start from exactly
    the same weights.  Cost: one copy of the base model on disk."""
    import llama_jax

    out = run_dir / INIT_DIR
    src = str(Path(resolve_path(cfg, cfg["model"]["init"])).absolute())
    source = {"converted_from": src, "seed": int(cfg["train"]["seed"]), "pad_token_id": pad}
    if (out / "config.json").exists():  # a resumed run: the same conversion, or a clear error
        have = json.loads((out / "rm_source.json").read_text()) if (out / "rm_source.json").exists() else {}
        if have != source:
            raise ConfigError(f"{out} was converted from {have or 'an unknown source'}, not {source}: "
                              "use a new --out for a different model.init / seed / pad")
        return out
    lm = build_model(cfg, mesh, vocab_size=None, head="lm")
    model = lm_to_score(lm, source["seed"], pad)
    del lm
    dtype = jnp.dtype(model.embed_tokens.embedding.get_value().dtype).name
    llama_jax.save_hf(model, out, tokenizer=tok_path, dtype=dtype)
    if _is_primary():
        (out / "rm_source.json").write_text(json.dumps(source, indent=2) + "\n")
    if jax.process_count() > 1:  # the others read it next: wait for process 0's writes
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("rm_init_score")
    return out


def _tokenizer_path(cfg):
    init = cfg["model"]["init"]
    return resolve_path(cfg, cfg.get("tokenizer")) or (resolve_path(cfg, init) if init not in PRESETS else None)


def _tok_pad(tok):
    pad = getattr(tok, "pad_token_id", None)
    eos = getattr(tok, "eos_token_id", None)
    return None if pad is None or pad == eos else int(pad)


def _target_config(cfg, tok):
    """The model config model.init will give (read from config.json: no weights loaded), and the
    init's head ('score' / 'lm', None for a preset)."""
    from ..config import LlamaConfig, preset

    mc = cfg["model"]
    if mc["init"] in PRESETS:
        over = dict(mc.get("overrides") or {})
        over.setdefault("vocab_size", len(tok))
        return preset(mc["init"], **over), None
    path = Path(resolve_path(cfg, mc["init"]))
    if not path.exists():
        raise ConfigError(f"model.init: {path} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    return LlamaConfig.from_json_file(path / "config.json"), _init_kind(path)


def resolve_pad(cfg, tok) -> int:
    """data.pad_id, else the model's pad_token_id, else the tokenizer's pad (never EOS); checked
    against EOS and the vocab before any weights are built."""
    c, kind = _target_config(cfg, tok)
    pad = cfg["data"]["pad_id"]
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
                    cfg["model"]["init"])
    return pad


def build_rm_model(cfg, mesh, tok, run_dir: Path):
    """The score-head model for model.init (preset / HF causal LM / HF seq-cls / llama_jax ckpt) and
    the PAD id.  May rewrite cfg (model.overrides.pad_token_id, model.init, tokenizer) so that the
    stored run config rebuilds the same model for resume and export."""
    mc = cfg["model"]
    seed = int(cfg["train"]["seed"])
    pad = resolve_pad(cfg, tok)
    if mc["init"] in PRESETS:
        mc["overrides"] = dict(mc.get("overrides") or {})
        mc["overrides"].setdefault("pad_token_id", pad)  # the exported config.json must name the pad
        model = build_model(cfg, mesh, vocab_size=len(tok), head="score")
        init_score_head(model, seed)
    else:
        if _init_kind(Path(resolve_path(cfg, mc["init"]))) == "lm":
            tok_path = _tokenizer_path(cfg)
            conv = _score_init_dir(cfg, mesh, tok_path, pad, run_dir)
            cfg["tokenizer"] = tok_path  # keep the tokenizer when model.init moves to the converted dir
            mc["init"] = str(conv)
        model = build_model(cfg, mesh, vocab_size=None, head="score")
    score_head_float32(model)
    return model, pad


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
        g = _to_global({"ids": ids[host * per:(host + 1) * per], "mask": mask[host * per:(host + 1) * per]}, mesh, 0)
        s = fn(state, g["ids"], g["mask"])
        if nh > 1:
            from jax.experimental import multihost_utils

            s = multihost_utils.process_allgather(s, tiled=True)
        out.append(np.asarray(s)[:n])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def reference_sequences(cfg, tok, train_pairs) -> tuple[list[np.ndarray], str]:
    """What the offset is the mean score of: rm.norm_files (chat records ending in an assistant
    reply, e.g. SFT-policy samples, same template) or the training pairs' chosen responses."""
    dc, rc = cfg["data"], cfg["rm"]
    files = rc["norm_files"] if isinstance(rc["norm_files"], list) else [rc["norm_files"]]
    n = int(rc["norm_samples"])
    if files:
        exs, _ = load_sft([resolve_path(cfg, f) for f in files], tok, dc["template"], int(dc["max_length"]),
                          dc["on_error"])
        seqs, source = [e.input_ids for e in exs], ",".join(map(str, files))
    else:
        seqs, source = [np.concatenate([p.prompt_ids, p.chosen_ids]) for p in train_pairs], "train_chosen"
    if len(seqs) > n:  # a fixed sample: the offset is a function of the config
        idx = np.sort(np.random.default_rng([int(cfg["train"]["seed"]), 7]).permutation(len(seqs))[:n])
        seqs = [seqs[i] for i in idx]
    return seqs, source


def read_norm(run_or_export_dir) -> dict | None:
    f = Path(run_or_export_dir) / NORM_FILE
    return json.loads(f.read_text()) if f.exists() else None


def add_norm_to_export(hf_dir, norm: dict) -> None:
    """reward_norm.json next to the weights and `reward_offset` in config.json (transformers keeps
    unknown config fields as attributes: normalised = logits[:, 0] - config.reward_offset)."""
    if not _is_primary():
        return
    hf_dir = Path(hf_dir)
    (hf_dir / NORM_FILE).write_text(json.dumps(norm, indent=2) + "\n")
    c = json.loads((hf_dir / "config.json").read_text())
    c["reward_offset"] = norm["offset"]
    tmp = hf_dir / "config.json.tmp"
    tmp.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, hf_dir / "config.json")


def export(run_dir, out, step: int | None = None) -> Path:
    """`llama-jax export` of an RM run + the normalisation offset (when it belongs to that step)."""
    from ..export import export as export_run

    out = export_run(run_dir, out, step=step)
    norm = read_norm(run_dir)
    if norm is not None and (step is None or step == norm.get("step")):
        add_norm_to_export(out, norm)
    return Path(out)


def _mark_score_run(run_dir: Path, cfg: dict) -> None:
    """The loop writes config.json without '_' keys; export needs `_head: score` to rebuild the
    score-head model, so it is put back (after the loop's write)."""
    if not _is_primary():
        return
    f = run_dir / "config.json"
    if not f.exists():
        return
    c = json.loads(f.read_text())
    if c.get("_head") == "score":
        return
    c["_head"] = "score"
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(c, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, f)


# ----------------------------------------------------------------------------- stage
def build_task(cfg, tok, model, pad: int):
    dc, tc, rc = cfg["data"], cfg["train"], cfg["rm"]
    T = int(dc["max_length"])
    if T > model.config.max_position_embeddings:
        raise ConfigError(f"data.max_length={T} exceeds the model's max_position_embeddings="
                          f"{model.config.max_position_embeddings}")
    as_list = lambda v: v if isinstance(v, list) else ([v] if v else [])
    files = [resolve_path(cfg, f) for f in as_list(dc["train_files"])]
    if not files:
        raise ConfigError("data.train_files: no training data given")
    load = lambda fs: load_rm_pairs(fs, tok, dc["template"], T, dc["max_prompt_length"], dc["margin_field"],
                                    dc["on_error"])
    pairs, margins, stats = load(files)
    print(f"rm data: {stats.report()}")
    seed = int(tc["seed"])
    if dc["max_pairs"]:
        pairs, margins = pairs[: int(dc["max_pairs"])], margins[: int(dc["max_pairs"])]
    if dc["eval_files"]:
        ev_pairs, ev_margins, _ = load([resolve_path(cfg, f) for f in as_list(dc["eval_files"])])
    else:  # a seeded random hold-out: the files are concatenated, so "the last n" is one source only
        n_eval = max(1, int(round(len(pairs) * float(dc["eval_fraction"]))))
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
    G = int(tc["batch_size"])
    if len(pairs) < G:
        raise DataError(f"{files}: only {len(pairs)} training pairs for a batch of {G}")
    if tc["steps"] is None:
        tc["steps"] = max(1, int(float(dc["epochs"]) * len(pairs)) // G)
    host, nh = jax.process_index(), jax.process_count()
    mult = int(dc["pad_to_multiple"])
    batches = PairBatches(pairs, margins, G, seed, pad, mult, host, nh)
    limit = None if tc["eval_batches"] is None else int(tc["eval_batches"])
    ev = eval_batches(ev_pairs, ev_margins, G, pad, mult, host, nh, limit) if tc["eval_every"] else []
    # throughput in real tokens: "rows" of the loop are pairs here, tokens per pair on average
    per_pair = float(np.mean([2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]))
    c = model.config
    head_free = c.num_params(include_embeddings=False) - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
    fpt = 6.0 * head_free + 12.0 * c.num_hidden_layers * c.hidden_size * per_pair / 2
    coef = float(rc["center_coef"])
    print(f"rm data: {len(pairs)} training pairs, {len(ev_pairs)} held out; {tc['steps']} steps of {G} pairs "
          f"({tc['steps'] * G / len(pairs):.2f} epochs); pad id {pad}")
    task = Task(name="rm", loss_fn=lambda m, b, rng: rm_loss(m, b, coef), train=batches, eval_batches=ev,
                flops_per_token=fpt, tokens_per_row=int(round(per_pair)),
                extra_meta={"pairs": len(pairs), "eval_pairs": len(ev_pairs)}, perplexity=False)
    return task, pairs


def run(config_path, out: str | None = None, overrides=()) -> dict:
    cfg = load_config(DEFAULTS, config_path, list(overrides))
    return run_config(cfg, out)


def run_config(cfg: dict, out: str | None = None) -> dict:
    from .lora_setup import maybe_apply_lora

    run_dir = Path(out or f"runs/{Path(cfg.get('_config_dir', '.')).name}-rm").absolute()
    cfg["_head"] = "score"
    mesh = build_mesh(cfg)
    tok = build_tokenizer(cfg)
    model, pad = build_rm_model(cfg, mesh, tok, run_dir)
    check_vocab(tok, model)
    task, train_pairs = build_task(cfg, tok, model, pad)
    lc = cfg["lora"]
    if lc["enabled"] and not any(m == "score" for m in lc["trainable_modules"]):
        # the head is new: LoRA alone would leave it at its random init
        lc["trainable_modules"] = list(lc["trainable_modules"]) + ["score"]
    trainable = maybe_apply_lora(cfg, model)

    def on_log(rec):
        _mark_score_run(run_dir, cfg)

    result = train(task, model, cfg, run_dir, mesh, trainable=trainable, on_log=on_log)
    _mark_score_run(run_dir, cfg)

    seqs, source = reference_sequences(cfg, tok, train_pairs)
    raw = score_sequences(model, seqs, pad, int(cfg["train"]["batch_size"]), mesh, int(cfg["data"]["pad_to_multiple"]))
    norm = {"offset": float(np.mean(raw)), "std": float(np.std(raw)), "count": int(len(raw)), "source": source,
            "step": int(cfg["train"]["steps"]), "pad_token_id": pad,
            "usage": "normalised reward = raw score - offset (raw score: score head at the last real token)"}
    if _is_primary():
        (run_dir / NORM_FILE).write_text(json.dumps(norm, indent=2) + "\n")
    print(f"rm: reward offset {norm['offset']:.4f} (std {norm['std']:.4f}) over {len(raw)} reference responses")
    result.update(run_dir=str(run_dir), model=model, pad_id=pad, reward_norm=norm)
    if cfg["rm"]["export_dir"]:
        out_dir = Path(resolve_path(cfg, cfg["rm"]["export_dir"]))
        result["export_dir"] = str(export(run_dir, out_dir))
        print(f"rm: exported to {out_dir}")
    return result

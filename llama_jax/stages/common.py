"""What every stage shares: building the model, tokenizer and mesh from a run config."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from ..config import PRESETS, preset
from ..train.config import ConfigError, resolve_path


def build_mesh(cfg):
    from ..sharding import make_mesh

    return make_mesh(cfg["mesh"])


def build_tokenizer(cfg):
    from ..text import load_tokenizer

    path = resolve_path(cfg, cfg.get("tokenizer")) or (
        cfg["model"]["init"] if cfg["model"]["init"] not in PRESETS else None)
    if path is None:
        raise ConfigError("tokenizer: required when model.init is a preset")
    if not Path(path).exists():
        raise ConfigError(f"tokenizer: {path} not found")
    return load_tokenizer(path)


def build_model(cfg, mesh, vocab_size: int | None, head: str = "lm"):
    """model.init is a preset (initialised from train.seed) or a checkpoint path (loaded)."""
    import llama_jax

    mc = cfg["model"]
    runtime = dict(dtype=mc["dtype"], param_dtype=mc["param_dtype"], remat=mc["remat"],
                   scan_layers=mc["scan_layers"], attention_impl=mc["attention_impl"])
    init = mc["init"]
    if init in PRESETS:
        over = dict(mc.get("overrides") or {})
        if vocab_size is not None:
            over.setdefault("vocab_size", vocab_size)
        c = preset(init, **over, **runtime)
        return llama_jax.init_model(c, seed=int(cfg["train"]["seed"]), head=head, mesh=mesh)
    path = resolve_path(cfg, init)
    if not Path(path).exists():
        raise ConfigError(f"model.init: {path} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    m = llama_jax.load(path, mesh=mesh, head=head, **{k: v for k, v in runtime.items()})
    return m


def check_vocab(tok, model):
    n = len(tok)
    if n > model.config.vocab_size:
        raise ConfigError(f"tokenizer has {n} tokens but the model's vocab_size is {model.config.vocab_size}: "
                          "resize the model first (llama-jax resize)")


def next_token(x, fill=0):
    """x shifted one position left, `fill` at the end: row t holds token t+1.  Losses score all T
    logits against these targets (the last weighted 0) instead of slicing logits[:, :-1], whose
    gradient XLA pads back into a second [B, T, vocab] buffer."""
    return jnp.concatenate([x[:, 1:], jnp.full_like(x[:, :1], fill)], axis=1)


def token_cross_entropy(logits, targets, weights):
    """Sum of next-token cross entropy over weighted positions, in float32."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * weights), jnp.sum(weights)


def flops_per_token(model_cfg, seq_len: int) -> float:
    """PaLM-style model FLOPs: 6 N (non-embedding matmul params, lm_head included) + 12 L d T."""
    n = model_cfg.num_params(include_embeddings=False)
    return 6.0 * n + 12.0 * model_cfg.num_hidden_layers * model_cfg.hidden_size * seq_len


def eval_batches(rows: dict, global_batch: int, max_batches: int) -> list[dict]:
    """Up to `max_batches` whole global batches of the leading rows; this host's slice of each."""
    host, nh = jax.process_index(), jax.process_count()
    n = min(len(next(iter(rows.values()))) // global_batch, int(max_batches)) * global_batch
    per = global_batch // nh
    return [{k: v[b0 + host * per:b0 + (host + 1) * per] for k, v in rows.items()}
            for b0 in range(0, n, global_batch)]


def run_stage(cfg: dict, out: str | None, name: str, build_task, head: str = "lm") -> dict:
    """The shape of every supervised stage: mesh, tokenizer, model, the stage's Task (built before
    LoRA is attached, so anything it precomputes sees the initial model), LoRA, the shared loop."""
    from ..train.loop import train
    from .lora_setup import maybe_apply_lora

    run_dir = Path(out or f"runs/{Path(cfg.get('_config_dir', '.')).name}-{name}").absolute()
    mesh = build_mesh(cfg)
    tok = build_tokenizer(cfg)
    model = build_model(cfg, mesh, vocab_size=len(tok), head=head)
    check_vocab(tok, model)
    task = build_task(cfg, tok, model, run_dir)
    trainable = maybe_apply_lora(cfg, model)
    result = train(task, model, cfg, run_dir, mesh, trainable=trainable)
    result.update(run_dir=str(run_dir), model=model)
    return result


def text_eval_sets(cfg, tok, block_size: int, global_batch: int, cache_dir, text_field: str = "text",
                   loss_fn=None) -> list:
    """data.eval_sets ({name: [text files]}) -> named LM eval sets for the loop (forgetting: e.g. an
    English set scored while training on Chinese).  Documents are packed BOS ... EOS into rows of
    block_size like pretraining data; up to train.eval_batches global batches each.  Characters
    per predicted token are measured over the whole set, for bits per character.
    loss_fn: None when the stage's own loss reads packed LM rows (pretraining), else one that does."""
    from ..data.packing import pack, tokenize_documents
    from ..data.sources import DataError, expand, load_texts
    import numpy as np

    from ..train.loop import EvalSet

    sets = cfg["data"].get("eval_sets") or {}
    if not isinstance(sets, dict):
        raise ConfigError("data.eval_sets: expected a mapping {name: [files]}")
    out = []
    bos, eos = getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)
    for name, files in sets.items():
        files = expand([resolve_path(cfg, f) for f in ([files] if isinstance(files, str) else files or [])])
        docs = tokenize_documents(tok, files, text_field, 1, cache_dir)
        chars = sum(len(t) for t in load_texts(files, text_field)["text"] if t)
        blocks = pack(docs, block_size, bos, eos)
        nseg = next_token(blocks.segments)
        predicted = int(((nseg == blocks.segments) & (nseg > 0)).sum())
        rows = {"tokens": blocks.tokens, "segments": blocks.segments, "positions": blocks.positions}
        if len(blocks) % global_batch:  # fill the last batch with empty rows (segment 0: no loss)
            fill = global_batch - len(blocks) % global_batch
            rows = {k: np.concatenate([v, np.zeros((fill, v.shape[1]), v.dtype)]) for k, v in rows.items()}
        batches = eval_batches(rows, global_batch, cfg["train"]["eval_batches"])
        if not batches or predicted == 0:
            raise DataError(f"data.eval_sets.{name}: {files}: no tokens to evaluate")
        out.append(EvalSet(str(name), batches, chars / predicted, loss_fn))
        print(f"eval set {name}: {len(docs)} documents, {chars} characters, {predicted} predicted tokens "
              f"({chars / predicted:.2f} chars/token), {len(batches)} batch(es)")
    return out

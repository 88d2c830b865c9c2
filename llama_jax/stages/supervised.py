"""What the supervised stages share: the next-token loss pieces, eval batches, named LM eval sets
(forgetting), and `run_stage`, the shape of every supervised stage on the shared loop."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..data.packing import pack, tokenize_documents
from ..data.sources import DataError, expand, load_texts
from ..train.config import ON_ERROR, RunConfig, Section, opt
from ..train.loop import EvalSet, train
from ..train.run import build, trainable_filter


# ----------------------------------------------------------------------------- the data sections
@dataclass
class DataFiles(Section):
    """Training files and what is held out for eval (every supervised stage's `data` starts so)."""
    train_files: list[str] = opt([], "training data files (json / jsonl / parquet / txt, globs allowed)")
    eval_files: list[str] = opt([], "held-out files (default: data.eval_fraction of the training data)")
    eval_fraction: float = opt(0.05, "share of the training data held out when there are no eval_files")


@dataclass
class ChatFiles(DataFiles):
    """Chat / preference records rendered with a chat template."""
    template: str = opt("chinese-alpaca-2", "chat template (llama2-chat, chinese-alpaca-2, alpaca, tokenizer)")
    max_length: int = opt(512, "tokens per example; longer examples are skipped (counted) or truncated")
    on_error: str = opt("skip", "a bad record: skip (counted) or error (stop, naming file, record and field)", ON_ERROR)


@dataclass
class PairData(ChatFiles):
    """Preference records (prompt / chosen / rejected, or conversations + chosen / rejected), for DPO
    and the reward model."""
    eval_fraction: float = opt(0.1, "share of the pairs held out when there are no eval_files")
    max_prompt_length: int | None = opt(None, "prompt tokens kept (left-truncated) when a pair is too long")


# ----------------------------------------------------------------------------- losses
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


def eval_batches(rows: dict, global_batch: int, max_batches: int | None) -> list[dict]:
    """Up to `max_batches` (None: all) whole global batches of the leading rows; this host's slice of each."""
    host, nh = jax.process_index(), jax.process_count()
    whole = len(next(iter(rows.values()))) // global_batch
    n = (whole if max_batches is None else min(whole, max_batches)) * global_batch
    per = global_batch // nh
    return [{k: v[b0 + host * per:b0 + (host + 1) * per] for k, v in rows.items()}
            for b0 in range(0, n, global_batch)]


def run_stage(cfg: RunConfig, out: str | None, name: str, build_task, head: str = "lm") -> dict:
    """The shape of every supervised stage: mesh, tokenizer, model, the stage's Task (built before
    LoRA is attached, so anything it precomputes sees the initial model), LoRA, the shared loop."""
    run_dir = Path(out).absolute() if out else cfg.default_run_dir(name)
    b = build(cfg, head=head)
    task = build_task(cfg, b.tokenizer, b.model, run_dir)
    trainable = trainable_filter(cfg, b.model)
    result = train(task, b.model, cfg, run_dir, b.mesh, trainable=trainable, head=head)
    result.update(run_dir=str(run_dir), model=b.model)
    return result


def text_eval_sets(cfg: RunConfig, tok, block_size: int, global_batch: int, cache_dir, text_field: str = "text",
                   loss_fn=None) -> list:
    """data.eval_sets ({name: [text files]}) -> named LM eval sets for the loop (forgetting: e.g. an
    English set scored while training on Chinese).  Documents are packed BOS ... EOS into rows of
    block_size like pretraining data; up to train.eval_batches global batches each.  Characters
    per predicted token are measured over the whole set, for bits per character.
    loss_fn: None when the stage's own loss reads packed LM rows (pretraining), else one that does."""
    sets = cfg.data.eval_sets or {}
    out = []
    bos, eos = getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)
    for name, files in sets.items():
        files = expand(cfg.paths([files] if isinstance(files, str) else files or []))
        docs = tokenize_documents(tok, files, text_field, 1, cache_dir)
        chars = sum(len(t) for t in load_texts(files, text_field)["text"] if t)
        blocks = pack(docs, block_size, bos, eos)
        nseg = next_token(blocks.segments)
        predicted = int(((nseg == blocks.segments) & (nseg > 0)).sum())
        rows = {"tokens": blocks.tokens, "segments": blocks.segments, "positions": blocks.positions}
        if len(blocks) % global_batch:  # fill the last batch with empty rows (segment 0: no loss)
            fill = global_batch - len(blocks) % global_batch
            rows = {k: np.concatenate([v, np.zeros((fill, v.shape[1]), v.dtype)]) for k, v in rows.items()}
        batches = eval_batches(rows, global_batch, cfg.train.eval_batches)
        if not batches or predicted == 0:
            raise DataError(f"data.eval_sets.{name}: {files}: no tokens to evaluate")
        out.append(EvalSet(str(name), batches, chars / predicted, loss_fn))
        print(f"eval set {name}: {len(docs)} documents, {chars} characters, {predicted} predicted tokens "
              f"({chars / predicted:.2f} chars/token), {len(batches)} batch(es)")
    return out

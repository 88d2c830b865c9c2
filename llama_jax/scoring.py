"""Scoring text with a model: log-likelihoods of continuations, sliding-window perplexity, and the
perplexity / bits-per-character arithmetic shared by `llama-jax eval` and the training loop.

Contract
- `lm_measures(nll, tokens, chars)`: the one place the measures are computed.  nll is a sum of
  natural-log losses over `tokens` predicted tokens covering `chars` characters of text:
  loss = nll / tokens, ppl = exp(loss), bpc = nll / ln 2 / chars.  Bits per character does not
  depend on the tokenizer, so it is the fair way to compare LLaMA-2's tokenizer with an extended one.
- `Scorer.loglikelihood(requests)`: requests are (context token ids, continuation token ids);
  returns (sum log p(continuation | context), continuation is the greedy choice) per request,
  with lm-evaluation-harness's HF-backend semantics: the model reads
  (context + continuation)[-(max_length + 1):][:-1] and the last len(continuation) positions are
  scored.  Requests whose continuation is one token and whose contexts are equal share one row:
  a multiple-choice question with single-token choices (" A" ... " D") costs one forward pass
  of its prompt, and each choice is read off the last position's log-softmax.
- Shared prefixes (few-shot): single-token rows are sorted and grouped by their common leading
  tokens; a group of >= 2 rows sharing >= `min_prefix` tokens (k-shot prompts of one subject share
  the description and the k examples) has that prefix run once into a KV cache, and only each
  row's own tail is computed against it.  The tokens fed are exactly the same, so the result is
  the same up to float rounding (the cached attention sums in another order); on one device.
- `sliding_windows` / `Scorer.perplexity`: HF's "perplexity of fixed-length models" recipe:
  windows of max_length tokens every `stride` tokens, each token scored once (in the first window
  that reaches it), with the most context that window gives it.
- Rows are right-padded (plain causal attention: a real token never sees the padding after it),
  sorted by length and padded to a few length buckets, so a run compiles a handful of shapes.
  With a mesh, rows are split over its (data, fsdp) axes like every training batch.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .model import Cache
from .sharding import named_sharding

LN2 = math.log(2.0)


def lm_measures(nll: float, tokens: float, chars: float | None = None) -> dict:
    """{'loss', 'ppl', 'bpc'} from a summed NLL (nats) over `tokens` tokens covering `chars` chars."""
    loss = float(nll) / max(float(tokens), 1.0)
    out = {"loss": loss, "ppl": math.exp(min(loss, 700.0))}
    if chars:
        out["bpc"] = float(nll) / LN2 / float(chars)
    return out


def length_bucket(n: int) -> int:
    """Smallest of 16, 24, 32, 48, 64, 96, ... (2^k and 1.5 * 2^k) that holds n: at most a third
    of a row is padding, and a whole evaluation compiles about two shapes per doubling."""
    b = 16
    while True:
        if n <= b:
            return b
        if n <= b + b // 2:
            return b + b // 2
        b *= 2


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored) over a sequence of n_tokens whose token 0 is a prefix (BOS) that is
    never scored: window tokens [begin, end) (at most max_length) are fed, targets begin+1 .. end-1
    predicted, of which those >= `first scored` count.  Windows start every `stride` tokens as in
    HF's recipe; a window that would leave a gap after the previous one (stride == max_length: HF's
    recipe then never scores each window's first token) starts one token earlier instead, so every
    token after the prefix is scored exactly once."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    out, prev_end, begin = [], 1, 0
    while prev_end < n_tokens:
        b = min(begin, prev_end - 1)
        e = min(b + max_length, n_tokens)
        out.append((b, e, prev_end))
        prev_end, begin = e, begin + stride
    return out


def _inference(graphdef, state):
    model = nnx.merge(graphdef, state)
    model.eval()  # LoRA dropout off
    return model


@functools.partial(jax.jit, static_argnums=(0,))
def _last_logprobs(graphdef, state, ids, last):
    """ids [B, T] right-padded, last [B]: log-softmax of the logits at each row's `last` position."""
    model = _inference(graphdef, state)
    h = model(ids, return_hidden=True)
    h = jnp.take_along_axis(h, last[:, None, None], axis=1)  # [B, 1, d]: only these rows are projected
    return jax.nn.log_softmax(model.project(h)[:, 0].astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnums=(0,))
def _row_logprobs(graphdef, state, ids, targets):
    """log p(targets[b, t] | ids[b, :t+1]) [B, T] and whether each target is the argmax."""
    model = _inference(graphdef, state)
    logits = model(ids).astype(jnp.float32)
    lp = jax.nn.log_softmax(logits, axis=-1)
    tlp = jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] >= jnp.max(logits, axis=-1)
    return tlp, greedy


def _broadcast_cache(cache, rows: int):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (rows,) + x.shape[1:]) if x.ndim else x, cache)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _prefix_cache(graphdef, state, prefix, length):
    """prefix [1, P] (left-padded: id -1 = empty) -> a one-row Cache of `length` columns holding it."""
    model = _inference(graphdef, state)
    real = prefix >= 0
    cache = Cache.init(model.config, 1, length, mesh=model.mesh)
    _, cache = model(jnp.where(real, prefix, 0), real.astype(jnp.int32), cache=cache, return_hidden=True,
                     fresh=True)
    return cache


@functools.partial(jax.jit, static_argnums=(0,))
def _tail_last_logprobs(graphdef, state, cache, start, ids, last):
    """ids [B, T] right-padded tails after the cached prefix (its real tokens end at position
    start - 1): log-softmax at each row's `last` position, as _last_logprobs on prefix + tail."""
    model = _inference(graphdef, state)
    B, T = ids.shape
    positions = start + jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    h, _ = model(ids, jnp.ones((B, T), jnp.int32), positions, cache=_broadcast_cache(cache, B), return_hidden=True)
    h = jnp.take_along_axis(h, last[:, None, None], axis=1)
    return jax.nn.log_softmax(model.project(h)[:, 0].astype(jnp.float32), axis=-1)


def prefix_groups(rows: Sequence[Sequence[int]], min_prefix: int) -> tuple[list[tuple[int, list[int]]], list[int]]:
    """Group row indices by a shared leading-token prefix: ([(prefix length, rows)], ungrouped rows).
    Rows are visited in sorted order, so rows with a common prefix are neighbours; a group keeps
    the prefix all its rows share, which is at least min_prefix and shorter than each row."""
    order = sorted(range(len(rows)), key=lambda i: tuple(rows[i]))
    groups, loose = [], []
    cur, plen = [], 0

    def close():
        if len(cur) >= 2:
            groups.append((plen, list(cur)))
        else:
            loose.extend(cur)

    for i in order:
        r = rows[i]
        if cur:
            a = rows[cur[0]]
            n = 0
            lim = min(plen, len(r) - 1)
            while n < lim and a[n] == r[n]:
                n += 1
            if n >= min_prefix:
                cur.append(i)
                plen = n
                continue
            close()
        cur, plen = [i], len(r) - 1
    if cur:
        close()
    return groups, loose


class Scorer:
    """Batched, bucketed scoring with one model (loaded on `mesh`, or on one device)."""

    def __init__(self, model, batch_size: int = 8, max_length: int | None = None, mesh=None,
                 min_prefix: int = 64):
        self.graphdef, self.state = nnx.split(model)
        # shared-prefix caching (module docstring) for groups sharing >= min_prefix tokens; 0 = off
        # (one device: multi-device meshes take the plain path, which splits rows over the mesh)
        self.min_prefix = int(min_prefix) if mesh is None or mesh.size == 1 else 0
        self.config = model.config
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.mesh = mesh
        shards = 1
        if mesh is not None:
            shards = int(mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))
        self.shards = shards
        self.batch_size = max(1, -(-int(batch_size) // shards) * shards)  # a multiple of the data shards
        self.rows_done = 0
        self.tokens_done = 0

    # ---------------------------------------------------------------- batching
    def _put(self, x):
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, named_sharding(self.mesh, ("batch", "length")[:x.ndim], x.shape))

    def _batches(self, lengths: Sequence[int]):
        """Index groups of at most batch_size rows, longest first, with their padded length."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            yield idx, length_bucket(max(lengths[i] for i in idx))

    def _rows(self, n: int) -> int:
        """Rows of a batch holding n: batch_size, or for a short last batch the smallest power-of-two
        multiple of the data shards that holds n (fewer dummy rows, a few more shapes)."""
        r = self.shards
        while r < n and r < self.batch_size:
            r *= 2
        return min(r, self.batch_size)

    def _pad(self, rows: list[Sequence[int]], T: int) -> np.ndarray:
        out = np.zeros((self._rows(len(rows)), T), np.int32)
        for r, x in enumerate(rows):
            out[r, :len(x)] = x
        return out

    # ---------------------------------------------------------------- requests
    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], progress=None
                      ) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, greedy) per (context ids, continuation ids) request."""
        L = self.max_length
        results: list = [None] * len(requests)
        singles: dict[tuple, list[int]] = {}  # context row -> requests with a one-token continuation
        multi: list[int] = []
        for i, (ctx, cont) in enumerate(requests):
            if len(cont) == 0:
                raise ValueError(f"request {i}: empty continuation")
            if len(cont) == 1 and len(ctx) > 0:
                singles.setdefault(tuple(list(ctx)[-L:]), []).append(i)
            else:
                multi.append(i)
        rows = list(singles)

        def record(i, lp_row):
            best = int(np.argmax(lp_row))
            for q in singles[rows[i]]:
                t = int(requests[q][1][0])
                results[q] = (float(lp_row[t]), t == best)

        groups, loose = prefix_groups(rows, self.min_prefix) if self.min_prefix else ([], list(range(len(rows))))
        for plen, members in groups:
            P = length_bucket(plen)
            prefix = np.full((1, P), -1, np.int32)
            prefix[0, P - plen:] = rows[members[0]][:plen]
            tails = [rows[i][plen:] for i in members]
            longest = length_bucket(max(len(t) for t in tails))
            cache = _prefix_cache(self.graphdef, self.state, jnp.asarray(prefix), P + longest)
            for sub, T in self._batches([len(t) for t in tails]):
                ids = self._pad([tails[j] for j in sub], T)
                last = np.zeros((len(ids),), np.int32)
                last[:len(sub)] = [len(tails[j]) - 1 for j in sub]
                lp = np.asarray(_tail_last_logprobs(self.graphdef, self.state, cache, jnp.int32(plen),
                                                    jnp.asarray(ids), jnp.asarray(last)))
                for r, j in enumerate(sub):
                    record(members[j], lp[r])
                self._count(len(sub), sum(len(tails[j]) for j in sub), progress,
                            sum(len(singles[rows[members[j]]]) for j in sub))
        rows_loose = loose
        for idx, T in self._batches([len(rows[i]) for i in rows_loose]):
            idx = [rows_loose[i] for i in idx]
            ids = self._pad([rows[i] for i in idx], T)
            last = np.zeros((len(ids),), np.int32)
            last[:len(idx)] = [len(rows[i]) - 1 for i in idx]
            lp = np.asarray(_last_logprobs(self.graphdef, self.state, self._put(ids), self._put(last)))
            for r, i in enumerate(idx):
                record(i, lp[r])
            self._count(len(idx), sum(len(rows[i]) for i in idx), progress, sum(len(singles[rows[i]]) for i in idx))
        if multi:
            fed, tgt = [], []
            for i in multi:
                ctx, cont = list(requests[i][0]), list(requests[i][1])
                whole = (ctx + cont)[-(L + 1):]
                fed.append(whole[:-1])
                tgt.append(whole[1:])
            for idx, T in self._batches([len(f) for f in fed]):
                ids, targets = self._pad([fed[i] for i in idx], T), self._pad([tgt[i] for i in idx], T)
                tlp, greedy = _row_logprobs(self.graphdef, self.state, self._put(ids), self._put(targets))
                tlp, greedy = np.asarray(tlp), np.asarray(greedy)
                for r, i in enumerate(idx):
                    n, k = len(fed[i]), len(requests[multi[i]][1])
                    results[multi[i]] = (float(tlp[r, n - k:n].sum()), bool(greedy[r, n - k:n].all()))
                self._count(len(idx), sum(len(fed[i]) for i in idx), progress, len(idx))
        return results

    def perplexity(self, token_ids: Sequence[int], prefix: int, max_length: int | None = None,
                   stride: int | None = None, progress=None) -> tuple[float, int]:
        """(summed NLL in nats, tokens scored) of token_ids after a prefix token (BOS, else EOS), every
        token scored once with sliding windows (HF's fixed-length-model recipe)."""
        L = int(max_length or self.max_length)
        S = int(stride or L)
        seq = np.concatenate([[prefix], np.asarray(token_ids, np.int64)]).astype(np.int32)
        wins = sliding_windows(len(seq), L, S)
        nll, count = 0.0, 0
        lengths = [e - b - 1 for b, e, _ in wins]
        for idx, T in self._batches(lengths):
            ids = self._pad([seq[wins[i][0]:wins[i][1] - 1] for i in idx], T)
            targets = self._pad([seq[wins[i][0] + 1:wins[i][1]] for i in idx], T)
            tlp, _ = _row_logprobs(self.graphdef, self.state, self._put(ids), self._put(targets))
            tlp = np.asarray(tlp, np.float64)
            for r, i in enumerate(idx):
                b, e, first = wins[i]
                # row position p predicts token b + 1 + p; scored are tokens first .. e-1
                nll -= float(tlp[r, first - b - 1:e - b - 1].sum())
                count += e - first
            self._count(len(idx), sum(lengths[i] for i in idx), progress, len(idx))
        return nll, count

    def _count(self, rows, tokens, progress, items):
        self.rows_done += rows
        self.tokens_done += tokens
        if progress is not None:
            progress(items, tokens)

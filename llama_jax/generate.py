"""Generation: jitted prefill, then one `lax.while_loop` decode with the KV cache donated.

Prompts are left-padded into one batch; positions continue per row from its own length, so a
batch gives the same tokens as each prompt alone.  Rows stop at EOS independently (later
tokens are `pad_id`), and the loop exits as soon as all rows are done.  For one prompt the tokens
can be streamed through an ordered host callback while the loop runs.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .model import Cache, Llama


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1 = off


def first_argmax(x):
    """jnp.argmax over the last axis (first index of the maximum), as int32, written as two plain
    reductions: XLA:CPU runs argmax's (value, index) reduction as a scalar loop, ~1 ms per decode
    step for [16, 4096] logits vs ~0.1 ms for this form (same result, ties included)."""
    V = x.shape[-1]
    hit = x == jnp.max(x, axis=-1, keepdims=True)
    return jnp.minimum(jnp.min(jnp.where(hit, jnp.arange(V, dtype=jnp.int32), V), axis=-1), V - 1)


def sample_token(logits, rng, sp: SamplingParams):
    """logits [B, V] float32 -> token ids [B]."""
    if sp.temperature <= 0:
        return first_argmax(logits)
    logits = logits / sp.temperature
    if sp.top_k and sp.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sp.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sp.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < sp.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    # = jax.random.categorical(rng, logits): the same Gumbel draw, a faster argmax
    return first_argmax(logits + jax.random.gumbel(rng, logits.shape, logits.dtype))


FILTER_CANDIDATES = 64  # sample_rows: top-k / top-p rows pick among this many most likely tokens first


def sample_rows(logits, keys, temperature, top_k, top_p):
    """Per-row sampling parameters (the server's slots): logits [B, V] float32, keys [B] (one
    PRNG key per row), temperature / top_k / top_p [B] -> token ids [B].

    A row with temperature <= 0 is greedy (first_argmax, as sample_token); otherwise the filters
    of sample_token (top-k, then top-p over what top-k kept, both renormalised; top_k <= 0 or
    >= V and top_p >= 1 are off) and a Gumbel draw from the row's own key.  sample_token takes its
    parameters statically; here they vary per row, and a full sort of [B, V] costs XLA:CPU ~30 ms
    per step at [16, 32000] (measured, contended 2-core VM: sort 448 ms vs lax.top_k(64) 4.7 ms).
    So a filtered row first takes the FILTER_CANDIDATES most likely tokens (lax.top_k) and draws
    among them -- exact whenever its filters keep only those (top_k <= FILTER_CANDIDATES, or a
    nucleus inside them); other filtered rows take the exact sorted path over the whole vocabulary,
    as do unfiltered sampled rows (no sort).  Each path runs only when some row needs it (lax.cond)."""
    B, V = logits.shape
    K = min(FILTER_CANDIDATES, V)
    hot = temperature > 0
    x = logits / jnp.where(hot, temperature, 1.0)[:, None]
    k = jnp.where((top_k > 0) & (top_k < V), top_k, V).astype(jnp.int32)
    filt = hot & ((k < V) | (top_p < 1.0))
    gumbel = lambda n: jax.vmap(lambda key: jax.random.gumbel(key, (n,), x.dtype))(keys)  # noqa: E731

    def nucleus(srt, p):
        """srt [B, n] descending (-inf = dropped) -> the smallest logit each row keeps for top_p."""
        probs = jax.nn.softmax(srt, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < p[:, None]
        return jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True), probs

    def candidates(x):
        vals, idx = jax.lax.top_k(x, K)
        in_k = jnp.arange(K)[None, :] < k[:, None]
        vals = jnp.where(in_k, vals, -jnp.inf)
        # without top-k, top-p is renormalised over the whole vocabulary: append the mass of the rest
        rest = jax.nn.logsumexp(jnp.where(x < vals[:, -1:], x, -jnp.inf), axis=-1, keepdims=True)
        rest = jnp.where(k[:, None] <= K, -jnp.inf, rest)
        cutoff, probs = nucleus(jnp.concatenate([vals, rest], axis=-1), top_p)
        exact = (k <= K) | ((k == V) & (top_p <= jnp.sum(probs[:, :K], axis=-1)))  # nucleus inside the candidates
        vals = jnp.where(vals < cutoff, -jnp.inf, vals)
        tok = jnp.take_along_axis(idx, first_argmax(vals + gumbel(K))[:, None], axis=-1)[:, 0]
        return tok.astype(jnp.int32), exact

    def whole(x):
        def filtered(x):
            srt = jnp.sort(x, axis=-1)[:, ::-1]
            kth = jnp.take_along_axis(srt, (k - 1)[:, None], axis=-1)
            srt = jnp.where(jnp.arange(V)[None, :] < k[:, None], srt, -jnp.inf)
            cutoff, _ = nucleus(srt, top_p)
            return jnp.where(filt[:, None] & ((x < kth) | (x < cutoff)), -jnp.inf, x)

        x = jax.lax.cond(jnp.any(filt), filtered, lambda x: x, x)
        return first_argmax(x + gumbel(V))

    greedy = first_argmax(logits)
    none = (greedy, jnp.zeros((B,), bool))
    tok_c, exact = jax.lax.cond(jnp.any(filt), candidates, lambda x: none, x)
    use_c = filt & exact
    tok_w = jax.lax.cond(jnp.any(hot & ~use_c), whole, lambda x: greedy, x)
    return jnp.where(hot, jnp.where(use_c, tok_c, tok_w), greedy)


def inference_model(graphdef, state):
    """The model for generation: always in eval mode (LoRA dropout off), whatever mode it was split
    in; a sampling loop must not draw dropout masks (nor mutate their RNG counters inside it)."""
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("fresh",), donate_argnums=(4,))
def prefill(graphdef, state, input_ids, attention_mask, cache: Cache, positions=None, *, fresh: bool = False):
    """Run the prompt through the model, filling the cache from its index (positions default to
    cumsum(mask) - 1, i.e. a fresh sequence); returns (last logits [B, V], cache).  fresh: the
    cache is empty (a new batch), so attention stays within the prompt and takes the configured
    kernel (`Llama.__call__`)."""
    model = inference_model(graphdef, state)
    logits, cache = model(input_ids, attention_mask, positions, cache=cache, last_only=True, fresh=fresh)
    return logits[:, -1], cache


def _decode(graphdef, state, cache: Cache, logits, positions, rng, sp: SamplingParams, eos_ids: tuple,
            pad_id: int, stream: Callable | None, *, hoist_layers: bool = False):
    """Sample from `logits`, then feed each new token back until max_new_tokens or all rows hit EOS.

    positions [B]: the position of the next token of each row.  Returns (tokens [B, N], cache); the
    cache holds every sampled token but the last one sampled (a caller continuing the sequence
    feeds that one first).  hoist_layers: slice the layer-stacked weights once, before the loop
    (see `decoder`)."""
    model = inference_model(graphdef, state)
    layer_params = model.layer_params() if hoist_layers else None
    B = logits.shape[0]
    N = sp.max_new_tokens
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def sample(step, out, done, logits, rng):
        rng, key = jax.random.split(rng)
        tok = jnp.where(done, pad_id, sample_token(logits, key, sp))
        out = out.at[:, step].set(tok)
        if stream is not None:
            jax.debug.callback(stream, tok, ordered=True)
        return tok, out, done | jnp.isin(tok, eos), rng

    def cond(c):
        step, _, done, *_ = c
        return (step < N) & ~jnp.all(done)

    def body(c):
        # feed the previous token, then sample the next: the loop never runs a forward pass whose
        # logits nobody samples (no lax.cond around the model, which would copy the cache)
        step, out, done, cache, tok, pos, rng = c
        lg, cache = model(tok[:, None], positions=pos[:, None], segment_ids=jnp.ones((B, 1), jnp.int32),
                          cache=cache, layer_params=layer_params)
        tok, out, done, rng = sample(step, out, done, lg[:, -1], rng)
        return step + 1, out, done, cache, tok, pos + 1, rng

    out = jnp.full((B, N), pad_id, jnp.int32)
    tok, out, done, rng = sample(0, out, jnp.zeros((B,), bool), logits, rng)
    init = (jnp.int32(1), out, done, cache, tok, positions.astype(jnp.int32), rng)
    _, out, _, cache, *_ = jax.lax.while_loop(cond, body, init)
    return out, cache


_JIT = dict(static_argnums=(0, 6, 7, 8, 9), static_argnames=("hoist_layers",), donate_argnums=(2,))
decode = jax.jit(_decode, **_JIT)
# XLA:CPU: Eigen's dot kernels beat the YNNPACK fusions on decode's [batch, d] x [d, f] shapes
# (batch 8: 1.81x vs 1.40x HF, docs/benchmarks.md), so the CPU decoder is compiled without them.
CPU_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
_decode_cpu = jax.jit(_decode, compiler_options=CPU_DECODE_OPTIONS, **_JIT)


@functools.lru_cache(maxsize=1)
def _cpu_options_supported() -> bool:
    """Whether this jaxlib knows CPU_DECODE_OPTIONS (an unknown option fails the compile)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_DECODE_OPTIONS).lower(jnp.float32(0)).compile()
        return True
    except Exception:  # noqa: BLE001 - any rejection means: compile without the options
        return False


def decode_compiler_options() -> dict | None:
    """CPU_DECODE_OPTIONS on CPU where this jaxlib knows them, else None: for other decode-shaped
    jitted steps (the server's) that want the decoder's compiler settings."""
    if jax.default_backend() == "cpu" and _cpu_options_supported():
        return CPU_DECODE_OPTIONS
    return None


def decoder() -> tuple[Callable, bool]:
    """(jitted decode, hoist_layers) for the default backend.  On CPU the layer-stacked weights are
    sliced once per call (XLA:CPU copies a slice of a stacked weight every time a loop step reads
    it: 4x slower per matmul, docs/benchmarks.md; this costs one extra copy of the weights in host
    RAM for the call) and the dots go to Eigen.  Accelerators, where HBM is the limit and the
    slice fuses into the matmul, keep slicing inside the loop."""
    if jax.default_backend() != "cpu":
        return decode, False
    return (_decode_cpu if _cpu_options_supported() else decode), True


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 8):
    """Left-pad token lists to one length (rounded up to `multiple` to limit recompiles)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    T = -(-T // multiple) * multiple
    ids = np.full((len(prompts), T), pad_id, np.int32)
    mask = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    return ids, mask


def generate(model: Llama, prompts, tokenizer=None, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stream: bool | Callable = False,
             pad_id: int | None = None, eos_ids: Sequence[int] | None = None):
    """Generate continuations.

    prompts: a string, a list of strings (needs `tokenizer`, an HF tokenizer that adds BOS as
    LLaMA-2 expects) or a list of token-id lists.  Returns a list of token-id lists (cut after
    EOS, EOS kept), or of strings when the prompts were strings.  stream=True prints the text of
    a single prompt to stdout as it is produced (or pass a callable receiving each token id).
    """
    single_text = isinstance(prompts, str)
    if single_text:
        prompts = [prompts]
    as_text = isinstance(prompts[0], str)
    if as_text:
        if tokenizer is None:
            raise ValueError("generate: text prompts need a tokenizer")
        prompts = [tokenizer(p)["input_ids"] for p in prompts]
    cfg = model.config
    eos = tuple(eos_ids) if eos_ids is not None else cfg.eos_token_ids
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad_id)
    B, T = ids.shape
    if T + max_new_tokens > cfg.max_position_embeddings and cfg.rope_type != "dynamic":
        print(f"warning: {T + max_new_tokens} tokens exceed max_position_embeddings="
              f"{cfg.max_position_embeddings}", file=sys.stderr)
    sp = SamplingParams(max_new_tokens, float(temperature), int(top_k), float(top_p))
    cb = _stream_callback(stream, tokenizer, B)
    graphdef, state = nnx.split(model)
    cache = Cache.init(cfg, B, T + max_new_tokens, mesh=model.mesh)
    logits, cache = prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), cache, fresh=True)
    positions = jnp.asarray(mask.sum(-1), jnp.int32)
    dec, hoist = decoder()
    out, _ = dec(graphdef, state, cache, logits, positions, jax.random.key(seed), sp, eos, int(pad_id), cb,
                 hoist_layers=hoist)
    out = np.asarray(out)
    if cb is not None:
        jax.effects_barrier()
        if stream is True:
            cb.finish()
    results = []
    for row in out:
        toks = row.tolist()
        for j, t in enumerate(toks):
            if t in eos:
                toks = toks[:j + 1]
                break
        results.append(toks)
    if as_text:
        return [tokenizer.decode(r, skip_special_tokens=True) for r in results]
    return results


class TextStreamer:
    """A token callback that prints the decoded text incrementally to stdout (decoding the whole tail
    keeps multi-byte characters whole); `finish()` ends the line.  Batch size 1.  Keep one instance
    per session: jit hashes it by identity, so a fresh one per call recompiles."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.printed = tokenizer, [], 0

    def __call__(self, tok):
        self.ids.append(int(np.asarray(tok)[0]))
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            return
        sys.stdout.write(text[self.printed:])
        sys.stdout.flush()
        self.printed = len(text)

    def finish(self):
        sys.stdout.write("\n")
        sys.stdout.flush()

    # a fresh instance per call would recompile; hashing by identity is what jit needs here
    __hash__ = object.__hash__


def _stream_callback(stream, tokenizer, batch):
    if not stream:
        return None
    if callable(stream) and stream is not True:
        return stream
    if batch != 1 or tokenizer is None:
        raise ValueError("generate: stream=True needs a single text prompt and a tokenizer")
    return TextStreamer(tokenizer)

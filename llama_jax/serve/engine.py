"""Continuous batching: a scheduler thread owns a KV cache of `max_batch` slots.

Contract
--------
* `Engine.submit(request)` queues a request (bounded: `QueueFull` when `max_queue` requests are
  already waiting) or raises `PromptTooLong` when its prompt leaves no room to generate.  Events
  (`Event`: new text, then a final one with `finish_reason`) are delivered through the request's
  `on_event` callback, from the scheduler thread; the callback must not block.
* Between decode steps the scheduler admits waiting requests into free slots: each prompt is
  prefilled alone, right-padded to the smallest length bucket that holds it (a few shapes, all
  compiled at start-up by `warm_up`), and its keys/values are copied into its slot's row of the
  shared cache.  Then ONE jitted step feeds every active slot its last token and samples the
  next, with per-slot temperature / top-k / top-p and a per-slot PRNG key (seeded from the
  request's seed, split once per token), so a request's tokens do not depend on which other
  requests share the batch.  A finished (EOS, stop string, max_tokens) or cancelled request
  frees its slot at once; the next step may already serve a new one.
* Each slot is one row of the model's own `Cache` with a per-row write index (model.cache_write):
  the decode step is the model's cached forward (model.cached_attention), not a second model.
  Inactive rows are fed segment id 0 (masked out, index not advanced).
* Token accounting: `completion_tokens` counts every sampled token, EOS included; the text
  never includes EOS or a stop string (nor anything after it).  A request may generate at most
  `max_length - len(prompt)` tokens (the context left); a larger `max_tokens` is capped to that
  (`Request.capped`), a prompt with no room left is refused.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..generate import decode_compiler_options, inference_model, sample_rows
from ..model import Cache

log = logging.getLogger("llama_jax.serve")


class QueueFull(Exception):
    """The bounded wait queue is full (the HTTP layer answers 429)."""


class PromptTooLong(ValueError):
    """The prompt leaves no room to generate within max_length (the HTTP layer answers 400)."""


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16          # slots: requests decoded together
    max_length: int = 4096       # per slot: prompt + generated tokens
    max_queue: int = 64          # requests waiting for a slot; more -> QueueFull
    prefill_buckets: tuple[int, ...] = ()  # prompt pad lengths; () = powers of two from 16, then max_length

    def buckets(self) -> tuple[int, ...]:
        if self.prefill_buckets:
            b = sorted({int(x) for x in self.prefill_buckets if 0 < int(x) <= self.max_length})
            return tuple(b if b and b[-1] == self.max_length else b + [self.max_length])
        out, b = [], 16
        while b < self.max_length:
            out.append(b)
            b *= 2
        return tuple(out + [self.max_length])


class Event(NamedTuple):
    text: str                      # new text since the last event ("" allowed)
    finish_reason: str | None      # None while running; "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    max_tokens: int | None = None      # None = the context left
    temperature: float = 1.0           # <= 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None            # None: a fresh random seed
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False           # generate through EOS (benchmarks: a fixed number of tokens)
    on_event: Callable[[Event], None] = lambda ev: None
    # set by the engine
    id: int = field(default_factory=lambda: next(_ids))
    capped: bool = False
    cancelled: bool = False
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finish_reason: str | None = None
    t_submit: float = 0.0
    t_first: float | None = None
    t_done: float | None = None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of `text` that could start a stop string (kept from the stream until
    the next tokens decide)."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:k]):
                keep = k
                break
    return keep


class Engine:
    """The scheduler and its compiled prefill / decode step (see the module docstring)."""

    def __init__(self, model, tokenizer, cfg: EngineConfig = EngineConfig(), eos_ids: Sequence[int] | None = None):
        mcfg = model.config
        self.cfg, self.tok = cfg, tokenizer
        if cfg.max_batch < 1 or cfg.max_length < 2 or cfg.max_queue < 0:
            raise ValueError(f"serve: bad engine config {cfg}")
        eos = tuple(eos_ids) if eos_ids is not None else tuple(mcfg.eos_token_ids)
        if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
            eos = (int(tokenizer.eos_token_id),)
        self.eos = frozenset(int(e) for e in eos)
        self.graphdef, self.state = nnx.split(model)
        # On CPU the layer-stacked weights are sliced once here, not in every step (XLA:CPU copies a
        # slice of a stacked weight whenever a step reads it; generate.decoder does the same per call).
        self.hoist = jax.default_backend() == "cpu"
        self.layer_params = model.layer_params() if self.hoist else None
        B, S = cfg.max_batch, cfg.max_length
        self.buckets = cfg.buckets()
        # committed to the device from the start, as the compiled steps return them: an uncommitted
        # first argument would make the warm-up compile a variant that real requests never use
        # A model loaded on a mesh (`--mesh`): the slots' state is replicated over it and the steps
        # run under GSPMD with the parameters' own shardings.
        mesh = getattr(model, "mesh", None)
        if mesh is not None and mesh.size > 1:
            dev = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        else:
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self.cache, self.tokens, self.keys = jax.device_put(
            (Cache.init(mcfg, B, S, mesh=model.mesh)._replace(index=jnp.zeros((B,), jnp.int32)), jnp.zeros((B,), jnp.int32),
             jax.random.split(jax.random.key(0), B)), dev)
        self.slots: list[Request | None] = [None] * B
        self.positions = np.zeros(B, np.int32)
        self.active = np.zeros(B, bool)
        self.temperature = np.zeros(B, np.float32)
        self.top_k = np.zeros(B, np.int32)
        self.top_p = np.ones(B, np.float32)
        self._queue: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._insert = jax.jit(self._insert_fn, static_argnums=(0,), donate_argnums=(3,))
        self._first = jax.jit(self._first_fn, donate_argnums=(1, 2))
        self._step = jax.jit(self._step_fn, static_argnums=(0,), donate_argnums=(3, 4, 5),
                             compiler_options=decode_compiler_options())
        self.counters = collections.Counter()
        self.busy_s = 0.0

    # ------------------------------------------------------------------ compiled pieces
    @staticmethod
    def _insert_fn(graphdef, state, layer_params, cache, ids, n, slot):
        """Prefill ids [1, T] (n real tokens, right-padded) into a fresh [1, T] cache, copy it into
        row `slot` of the shared cache; returns (cache, the logits at n - 1 [1, V])."""
        model = inference_model(graphdef, state)
        T = ids.shape[1]
        small = Cache.init(model.config, 1, T, dtype=jax.tree.leaves(cache.k)[0].dtype, mesh=model.mesh)
        mask = (jnp.arange(T) < n)[None].astype(jnp.int32)
        pos = jnp.arange(T, dtype=jnp.int32)[None]
        h, small = model(ids, mask, pos, cache=small, return_hidden=True, layer_params=layer_params, fresh=True)
        logits = model.project(jax.lax.dynamic_slice_in_dim(h, n - 1, 1, axis=1))[:, 0]
        S = cache.segment_ids.shape[1]
        row = lambda a: jax.lax.dynamic_update_slice(jnp.zeros((1, S), jnp.int32), a, (0, 0))  # noqa: E731
        put = lambda big, one: jax.lax.dynamic_update_slice(big, one, (slot,) + (0,) * (big.ndim - 1))  # noqa: E731
        cache = Cache(jax.tree.map(put, cache.k, small.k), jax.tree.map(put, cache.v, small.v),
                      put(cache.segment_ids, row(small.segment_ids)), put(cache.positions, row(small.positions)),
                      cache.index.at[slot].set(n))
        return cache, logits

    @staticmethod
    def _first_fn(logits, tokens, keys, slot, seed, temperature, top_k, top_p):
        """The first token of a request from its prefill logits, with its own freshly seeded key
        (apart from the prefill: compiled once, not once per bucket)."""
        key, sub = jax.random.split(jax.random.key(seed))
        tok = sample_rows(logits, sub[None], temperature[None], top_k[None], top_p[None])[0]
        return tokens.at[slot].set(tok), keys.at[slot].set(key), tok

    @staticmethod
    def _step_fn(graphdef, state, layer_params, cache, tokens, keys, positions, active, temperature, top_k, top_p):
        """Feed every slot its last token (inactive slots as padding), sample the next."""
        model = inference_model(graphdef, state)
        seg = active.astype(jnp.int32)[:, None]
        logits, new = model(tokens[:, None], positions=positions[:, None], segment_ids=seg, cache=cache,
                            layer_params=layer_params)
        new = new._replace(index=jnp.where(active, new.index, cache.index))
        split = jax.vmap(jax.random.split)(keys)
        tok = sample_rows(logits[:, -1], split[:, 1], temperature, top_k, top_p)
        return new, jnp.where(active, tok, tokens), split[:, 0], tok

    def _run_insert(self, ids: np.ndarray, n: int, slot: int, seed: int, temperature, top_k, top_p) -> int:
        self.cache, logits = self._insert(self.graphdef, self.state, self.layer_params, self.cache,
                                          jnp.asarray(ids), np.int32(n), np.int32(slot))
        self.tokens, self.keys, tok = self._first(logits, self.tokens, self.keys, np.int32(slot), np.uint32(seed),
                                                  np.float32(temperature), np.int32(top_k), np.float32(top_p))
        return int(tok)

    def _run_step(self) -> np.ndarray:
        self.cache, self.tokens, self.keys, tok = self._step(
            self.graphdef, self.state, self.layer_params, self.cache, self.tokens, self.keys,
            self.positions, self.active, self.temperature, self.top_k, self.top_p)
        return np.asarray(tok)

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise PromptTooLong(f"prompt of {n} tokens exceeds max_length={self.cfg.max_length}")

    def warm_up(self, progress: Callable[[str], None] | None = None) -> float:
        """Compile the prefill of every bucket and the decode step (run once on dummy data, which
        leaves every slot inactive).  Returns the seconds it took."""
        t0 = time.perf_counter()
        for b in self.buckets:
            if progress:
                progress(f"compiling prefill for prompts up to {b} tokens")
            self._run_insert(np.zeros((1, b), np.int32), 1, 0, 0, 0.5, 5, 0.9)
        if progress:
            progress(f"compiling the decode step ({self.cfg.max_batch} slots)")
        self.temperature[0], self.top_k[0], self.top_p[0] = 0.5, 5, 0.9  # the sampling branch too
        self._run_step()
        self.temperature[0], self.top_k[0], self.top_p[0] = 0.0, 0, 1.0
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ public API
    def start(self, warm_up: bool = True, progress=None) -> "Engine":
        if warm_up:
            self.warm_up(progress)
        self._thread = threading.Thread(target=self._loop, name="llama-jax-scheduler", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def context_left(self, n_prompt: int) -> int:
        return self.cfg.max_length - n_prompt

    def submit(self, req: Request) -> Request:
        n = len(req.prompt_ids)
        if n == 0:
            raise PromptTooLong("the prompt is empty (no tokens)")
        left = self.context_left(n)
        if left < 1:
            raise PromptTooLong(f"the prompt has {n} tokens; max_length={self.cfg.max_length} leaves no room "
                                "to generate")
        if req.max_tokens is None or req.max_tokens > left:
            req.capped = req.max_tokens is not None
            req.max_tokens = left
        if req.seed is None:
            req.seed = int(np.random.default_rng().integers(0, 2 ** 32))
        req.t_submit = time.perf_counter()
        with self._cv:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.cfg.max_queue:
                self.counters["rejected"] += 1
                raise QueueFull(f"{len(self._queue)} requests are waiting (max_queue={self.cfg.max_queue})")
            self._queue.append(req)
            self._cv.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Ask the scheduler to drop `req` (its slot is freed before the next step)."""
        req.cancelled = True
        with self._cv:
            self._cv.notify_all()

    def stats(self) -> dict:
        with self._cv:
            queued = len(self._queue)
        return {"active": int(self.active.sum()), "queued": queued, "max_batch": self.cfg.max_batch,
                "max_queue": self.cfg.max_queue, "max_length": self.cfg.max_length, **dict(self.counters)}

    # ------------------------------------------------------------------ the scheduler
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._queue and not self.active.any():
                    self._cv.wait(0.5)
                if self._stop:
                    break
            try:
                t0 = time.perf_counter()
                self._admit()
                self._drop_cancelled()
                if self.active.any():
                    self._decode()
                self.busy_s += time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, never the server
                log.exception("serve: scheduler step failed")
                for s, r in enumerate(self.slots):
                    if r is not None:
                        self._finish(s, r, "error", error=f"{type(e).__name__}: {e}")
        for s, r in enumerate(self.slots):
            if r is not None:
                self._finish(s, r, "cancelled")
        while self._queue:
            r = self._queue.popleft()
            r.finish_reason = "cancelled"
            self._emit(r, "", "cancelled")

    def _admit(self) -> None:
        while True:
            free = [s for s in range(self.cfg.max_batch) if self.slots[s] is None]
            if not free:
                return
            with self._cv:
                if not self._queue:
                    return
                req = self._queue.popleft()
            if req.cancelled:
                req.finish_reason = "cancelled"
                self.counters["cancelled"] += 1
                self._emit(req, "", "cancelled")
                continue
            slot, n = free[0], len(req.prompt_ids)
            ids = np.zeros((1, self.bucket(n)), np.int32)
            ids[0, :n] = req.prompt_ids
            self.slots[slot] = req
            try:
                tok = self._run_insert(ids, n, slot, req.seed % 2 ** 32, req.temperature, req.top_k, req.top_p)
            except Exception as e:  # noqa: BLE001
                log.exception("serve: prefill failed")
                self._finish(slot, req, "error", error=f"{type(e).__name__}: {e}")
                continue
            self.positions[slot] = n
            self.temperature[slot], self.top_k[slot], self.top_p[slot] = req.temperature, req.top_k, req.top_p
            self.active[slot] = True
            req.t_first = time.perf_counter()
            self.counters["prefills"] += 1
            self._take(slot, req, tok)

    def _drop_cancelled(self) -> None:
        for s, r in enumerate(self.slots):
            if r is not None and r.cancelled:
                self._finish(s, r, "cancelled")

    def _decode(self) -> None:
        toks = self._run_step()
        self.counters["steps"] += 1
        for s in np.flatnonzero(self.active):
            self.positions[s] += 1
            self._take(s, self.slots[s], int(toks[s]))

    def _take(self, slot: int, req: Request, tok: int) -> None:
        """Account one sampled token of `req`; finish it on EOS, a stop string or max_tokens."""
        req.output_ids.append(tok)
        self.counters["tokens"] += 1
        if tok in self.eos and not req.ignore_eos:
            return self._finish(slot, req, "stop")
        text = self.tok.decode(req.output_ids, skip_special_tokens=True)
        if req.stop:
            start = max(0, len(req.text) - max(len(s) for s in req.stop))
            hits = [i for i in (text.find(s, start) for s in req.stop) if i >= 0]
            if hits:
                req.text = text[:min(hits)]
                return self._finish(slot, req, "stop")
        req.text = text
        if len(req.output_ids) >= req.max_tokens:
            return self._finish(slot, req, "length")
        end = len(text) - _held_back(text, req.stop)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            end = min(end, len(text.rstrip("\ufffd")))
        if end > req.sent:
            self._emit(req, text[req.sent:end], None)
            req.sent = end

    def _finish(self, slot: int, req: Request, reason: str, error: str | None = None) -> None:
        self.slots[slot] = None
        self.active[slot] = False
        self.temperature[slot], self.top_k[slot], self.top_p[slot] = 0.0, 0, 1.0
        req.finish_reason = reason
        req.t_done = time.perf_counter()
        self.counters["finished_" + reason] += 1
        rest = req.text[req.sent:] if reason in ("stop", "length") else ""
        req.sent = len(req.text)
        self._emit(req, rest, reason, error)

    def _emit(self, req: Request, text: str, reason: str | None, error: str | None = None) -> None:
        try:
            req.on_event(Event(text, reason, len(req.prompt_ids), len(req.output_ids), error))
        except Exception:  # noqa: BLE001 - a consumer's failure must not stop the scheduler
            log.exception("serve: event callback failed")
            req.cancelled = True

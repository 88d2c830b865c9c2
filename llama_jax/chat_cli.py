"""`llama-jax chat`: multi-turn chat in the terminal, streamed, with the KV cache kept across turns.

Each turn only the new user turn's tokens are run through the model (appended at the cache's
index, positions continuing); the previous turns' keys and values stay in the cache.  When the
cache would overflow, the history is re-encoded from the newest turns that fit.  A reply is
capped at the context left (said once per session); only a message that itself does not fit in
max_length is refused.
"""
from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .data.records import Conversation
from .data.templates import get_template, resolve_template
from .generate import SamplingParams, TextStreamer, decoder, prefill
from .hf import load
from .model import Cache
from .quant import quantize_model
from .text import load_tokenizer

PAD_MULTIPLE = 16  # new-turn lengths are padded to few shapes, so turns rarely recompile


class ChatSession:
    def __init__(self, model, tokenizer, template="chinese-alpaca-2", system=None, max_new_tokens=256,
                 temperature=0.7, top_k=0, top_p=0.9, seed=0, max_length=None, stream=True):
        self.model, self.tok, self.template, self.system = model, tokenizer, get_template(template), system
        self.sp = SamplingParams(int(max_new_tokens), float(temperature), int(top_k), float(top_p))
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.graphdef, self.state = nnx.split(model)
        self.eos = model.config.eos_token_ids or (tokenizer.eos_token_id,)
        self.streamer = TextStreamer(tokenizer) if stream else None  # one object: no recompile per turn
        self.rng = jax.random.key(seed)
        self.capped_said = False
        self.reset()

    def reset(self):
        self.history: list[tuple[str, list[int]]] = []  # (user text, response ids as generated)
        self.cache = Cache.init(self.model.config, 1, self.max_length, mesh=self.model.mesh)
        self.next_pos = 0
        self.pending: list[int] = []  # a final token the decoder sampled but did not feed

    def _turn_ids(self, user: str, past: list[tuple[str, list[int]]]) -> list[int]:
        msgs = []
        for u, _ in past:
            msgs += [("user", u), ("assistant", "x")]
        conv = Conversation(self.system, msgs + [("user", user), ("assistant", "x")])
        return list(self.template.exchanges(conv, self.tok)[-1][0])

    def _prefill(self, ids: list[int]):
        n = len(ids)
        T = -(-n // PAD_MULTIPLE) * PAD_MULTIPLE
        x = np.zeros((1, T), np.int32)
        m = np.zeros((1, T), np.int32)
        x[0, T - n:], m[0, T - n:] = ids, 1
        pos = np.zeros((1, T), np.int32)
        pos[0, T - n:] = np.arange(self.next_pos, self.next_pos + n)
        logits, self.cache = prefill(self.graphdef, self.state, jnp.asarray(x), jnp.asarray(m), self.cache,
                                     jnp.asarray(pos))
        self.next_pos += n
        return logits

    @staticmethod
    def _padded(n: int) -> int:
        return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE

    def _reencode(self, user: str) -> list[int]:
        """Start a fresh cache holding the newest turns that fit with a full reply after them (or,
        when not even the new message alone leaves that much room, only the new message: its reply
        is then capped at the context left), then this turn's prompt."""
        past = list(self.history)
        while True:
            ids = []
            for i, (u, resp) in enumerate(past):
                ids += self._turn_ids(u, past[:i]) + resp
            ids += self._turn_ids(user, past)
            if self._padded(len(ids)) + self.sp.max_new_tokens <= self.max_length or not past:
                break
            past = past[1:]
        if self._padded(len(ids)) >= self.max_length:
            raise ValueError(f"the message is too long: {len(ids)} tokens with the template leave no room to reply "
                             f"within max_length={self.max_length}")
        self.history = past
        self.cache = Cache.init(self.model.config, 1, self.max_length, mesh=self.model.mesh)
        self.next_pos = 0
        return ids

    def ask(self, user: str) -> str:
        ids = self.pending + self._turn_ids(user, self.history)
        if int(self.cache.index) + self._padded(len(ids)) + self.sp.max_new_tokens > self.max_length:
            ids = self._reencode(user)  # raises (keeping the session as it was) when the message cannot fit
        self.pending = []
        left = self.max_length - int(self.cache.index) - self._padded(len(ids))
        sp = self.sp
        if left < sp.max_new_tokens:
            # cap the reply at the context left (a multiple of PAD_MULTIPLE, so few decode shapes compile)
            n = left - left % PAD_MULTIPLE if left >= PAD_MULTIPLE else left
            sp = dataclasses.replace(sp, max_new_tokens=n)
            if not self.capped_said:
                self.capped_said = True
                print(f"chat: note: --max-new-tokens {self.sp.max_new_tokens} does not fit in the context left "
                      f"(max_length={self.max_length}); replies are capped at the context left", file=sys.stderr)
        logits = self._prefill(ids)
        self.rng, key = jax.random.split(self.rng)
        if self.streamer is not None:
            self.streamer.ids, self.streamer.printed = [], 0
        dec, hoist = decoder()
        out, self.cache = dec(self.graphdef, self.state, self.cache, logits,
                                 jnp.asarray([self.next_pos], jnp.int32), key, sp, tuple(self.eos), 0,
                                 self.streamer, hoist_layers=hoist)
        toks = np.asarray(out)[0].tolist()
        resp = []
        for t in toks:
            resp.append(t)
            if t in self.eos:
                break
        # the decoder feeds every token but the last it sampled (EOS or the N-th)
        fed = len(resp) - 1
        self.pending = resp[fed:]
        self.next_pos += fed  # a pending token takes its position when the next turn feeds it
        self.history.append((user, resp))
        if self.streamer is not None:
            jax.effects_barrier()
            self.streamer.finish()
        return self.tok.decode(resp, skip_special_tokens=True)


def run_chat(args) -> int:
    model = load(args.model, dtype=args.dtype)
    if getattr(args, "quantization", None):  # weight-only quantized Linear kernels (llama_jax.quant)
        quantize_model(model, args.quantization)
    tok = load_tokenizer(args.tokenizer or args.model)
    template, source = resolve_template(args.template, args.model, tokenizer=tok)
    print(f"chat template {template!r} (from {source})", file=sys.stderr)
    s = ChatSession(model, tok, template, args.system, args.max_new_tokens, args.temperature, args.top_k,
                    args.top_p, args.seed)
    print("llama-jax chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits.")
    while True:
        try:
            line = input("\n>>> ")
        except EOFError:
            print()
            return 0
        line = line.strip()
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            s.reset()
            continue
        if line:
            s.ask(line)

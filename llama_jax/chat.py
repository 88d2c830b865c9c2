"""`llama-jax chat`: multi-turn chat in the terminal, streamed, with the KV cache kept across turns.

Each turn only the new user turn's tokens are run through the model (appended at the cache's
index, positions continuing); the previous turns' keys and values stay in the cache.  When the
cache would overflow, the history is re-encoded from the newest turns that fit.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .data.chat import Conversation, get_template
from .generate import SamplingParams, _TextStreamer, decoder, prefill
from .model import Cache

PAD_MULTIPLE = 16  # new-turn lengths are padded to few shapes, so turns rarely recompile


class ChatSession:
    def __init__(self, model, tokenizer, template="chinese-alpaca-2", system=None, max_new_tokens=256,
                 temperature=0.7, top_k=0, top_p=0.9, seed=0, max_length=None, stream=True):
        self.model, self.tok, self.template, self.system = model, tokenizer, get_template(template), system
        self.sp = SamplingParams(int(max_new_tokens), float(temperature), int(top_k), float(top_p))
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.graphdef, self.state = nnx.split(model)
        self.eos = model.config.eos_token_ids or (tokenizer.eos_token_id,)
        self.streamer = _TextStreamer(tokenizer) if stream else None  # one object: no recompile per turn
        self.rng = jax.random.key(seed)
        self.reset()

    def reset(self):
        self.history: list[tuple[str, list[int]]] = []  # (user text, response ids as generated)
        self.cache = Cache.init(self.model.config, 1, self.max_length)
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

    def _reencode(self, user: str) -> list[int]:
        """Start a fresh cache holding the newest turns that fit, then this turn's prompt."""
        past = list(self.history)
        budget = self.max_length - self.sp.max_new_tokens - PAD_MULTIPLE
        while True:
            ids = []
            for i, (u, resp) in enumerate(past):
                ids += self._turn_ids(u, past[:i]) + resp
            ids += self._turn_ids(user, past)
            if len(ids) <= budget or not past:
                break
            past = past[1:]
        if len(ids) > budget:
            raise ValueError(f"the message is too long for max_length={self.max_length}")
        self.history = past
        self.cache = Cache.init(self.model.config, 1, self.max_length)
        self.next_pos = 0
        return ids

    def ask(self, user: str) -> str:
        ids = self.pending + self._turn_ids(user, self.history)
        self.pending = []
        if int(self.cache.index) + len(ids) + PAD_MULTIPLE + self.sp.max_new_tokens > self.max_length:
            ids = self._reencode(user)
        logits = self._prefill(ids)
        self.rng, key = jax.random.split(self.rng)
        if self.streamer is not None:
            self.streamer.ids, self.streamer.printed = [], 0
        dec, hoist = decoder()
        out, self.cache = dec(self.graphdef, self.state, self.cache, logits,
                                 jnp.asarray([self.next_pos], jnp.int32), key, self.sp, tuple(self.eos), 0,
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
    import llama_jax
    from .text import load_tokenizer

    model = llama_jax.load(args.model, dtype=args.dtype)
    if getattr(args, "quantization", None):  # weight-only quantized Linear kernels (llama_jax.quant)
        from .quant import quantize_model

        quantize_model(model, args.quantization)
    tok = load_tokenizer(args.tokenizer or args.model)
    s = ChatSession(model, tok, args.template, args.system, args.max_new_tokens, args.temperature, args.top_k,
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

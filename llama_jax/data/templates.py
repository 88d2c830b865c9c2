"""Chat templates: a `Conversation` -> text, and -> token ids split into (prompt, response) per exchange.

Contract:
* `get_template(name)` gives a `Template` (names in `TEMPLATES`: llama2-chat, chinese-alpaca-2,
  alpaca, tokenizer); `Template.render(conv)` is the conversation as one string (BOS/EOS written
  as <s>/</s>), `Template.exchanges(conv, tokenizer)` the (prompt ids, response ids incl. EOS)
  of each user/assistant exchange: the response ids are the labelled part in SFT.
* `prompt_and_reply_ids` / `generation_prompt_ids`: the ids of a conversation that ends on a user
  turn up to where the assistant's reply starts (+ the reply's ids): the one way prompts are cut
  (preference pairs, RL prompts, the server, SFT's sample prompts).
* A model directory records the template it was trained with in `TEMPLATE_FILE`
  (`template_record`, `recorded_template`); `resolve_template` picks the template for serving.

Tokenising piece by piece, and sentencepiece's dummy prefix
-----------------------------------------------------------
LLaMA's sentencepiece model prepends "▁" (a space) to every string it encodes.  Meta's
Llama-2 chat code encodes each exchange `[INST] u [/INST] a ` as one string after BOS, and
Stanford Alpaca encodes prompt+response as one string.  To get the same ids while keeping
prompt and response apart, each piece is encoded in one of two ways:

* fresh: the first text after BOS is encoded as a new string, dummy prefix included (this is
  exactly what LLaMA does after BOS: `▁[INST]`, `▁Below`);
* glued: every other piece is encoded as if it continued the text before it, i.e. without the
  dummy prefix.  A piece that follows a space in the rendered text carries that space itself
  (" {answer} "), so its first word gets its "▁" just as in the whole string.

Gluing is exact because no LLaMA piece spans the boundaries templates cut at: pieces never hold
"▁" except at their start (or as whitespace-only runs), and no piece holds "\n" (newline is a
byte-fallback token), so BPE cannot merge across "]▁" or "\n".  The tests check the ids
against whole-string encoding on the real data.  For the sentencepiece tokenizer the glued
encoder is a second processor with add_dummy_prefix=false; for an HF tokenizer it encodes
"\n" + text and drops the ids of "\n" (checked on every call).  Text is encoded with special
token strings split, so a user who types "</s>" gets the characters, not an EOS.
"""
from __future__ import annotations

import abc
import json
import weakref
from dataclasses import dataclass
from pathlib import Path

from .records import ASSISTANT, SYSTEM, Conversation
from .sources import DataError

LLAMA2_SYSTEM_ZH = "You are a helpful assistant. 你是一个乐于助人的助手。"
ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
ALPACA_HEADER_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.")


# ----------------------------------------------------------------------------- tokenisation

class _Encoder:
    """fresh(text): encode as a new string (dummy prefix); glued(text): as a continuation."""

    def __init__(self, tok):
        self.bos, self.eos = getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)
        if hasattr(tok, "sp"):  # llama_jax.text.SentencePieceTokenizer
            import sentencepiece as spm
            from sentencepiece import sentencepiece_model_pb2 as pb

            proto = pb.ModelProto.FromString(tok.sp.serialized_model_proto())
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp, self._sp_glued = tok.sp, spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
            self.fresh, self.glued = self._sp.encode, self._sp_glued.encode
        else:
            # a weak reference: this encoder is cached in a WeakKeyDictionary keyed by the tokenizer
            try:
                self._tok = weakref.ref(tok)
            except TypeError:
                self._tok = lambda: tok
            self._nl = self._hf("\n")
            self.fresh = self._hf

    def _hf(self, text: str) -> list[int]:
        return self._tok()(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def glued(self, text: str) -> list[int]:
        ids = self._hf("\n" + text)
        if ids[:len(self._nl)] != self._nl:
            raise ValueError(f"tokenizer merges a newline with the text after it; cannot encode {text[:40]!r} "
                             "as a continuation")
        return ids[len(self._nl):]


_ENCODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _encoder(tok) -> _Encoder:
    try:
        enc = _ENCODERS.get(tok)
        if enc is None:
            enc = _ENCODERS[tok] = _Encoder(tok)
        return enc
    except TypeError:  # not weak-referenceable
        return _Encoder(tok)


# ----------------------------------------------------------------------------- templates

@dataclass(frozen=True)
class Piece:
    kind: str        # "bos" | "eos" | "prompt" | "response"
    text: str = ""
    turn: int = 0    # index of the user/assistant exchange


Exchange = tuple[list[int], list[int]]  # (prompt ids, response ids incl. EOS: the labelled part)


class Template(abc.ABC):
    name = "?"

    @abc.abstractmethod
    def render(self, conv: Conversation, tokenizer=None) -> str:
        """The conversation as one string (BOS/EOS written as <s>/</s>)."""

    @abc.abstractmethod
    def exchanges(self, conv: Conversation, tokenizer) -> list[Exchange]:
        """(prompt ids, response ids incl. EOS) per user/assistant exchange."""


class PieceTemplate(Template):
    """A template written as pieces; BOS/EOS are token ids, written "<s>"/"</s>" when rendered."""

    @abc.abstractmethod
    def pieces(self, conv: Conversation) -> list[Piece]:
        """The template's text pieces in order."""

    def render(self, conv: Conversation, tokenizer=None) -> str:
        return "".join({"bos": "<s>", "eos": "</s>"}.get(p.kind, p.text) for p in self.pieces(conv))

    def exchanges(self, conv: Conversation, tokenizer) -> list[Exchange]:
        enc = _encoder(tokenizer)
        if enc.bos is None or enc.eos is None:
            raise ValueError(f"template {self.name!r} needs a tokenizer with BOS and EOS ids")
        out: list[Exchange] = []
        prev = None
        for p in self.pieces(conv):
            while len(out) <= p.turn:
                out.append(([], []))
            if p.kind == "bos":
                ids = [enc.bos]
            elif p.kind == "eos":
                ids = [enc.eos]
            else:
                ids = enc.fresh(p.text) if prev in (None, "bos") else enc.glued(p.text)
            out[p.turn][1 if p.kind in ("response", "eos") else 0].extend(ids)
            prev = p.kind
        return out


class Llama2Chat(PieceTemplate):
    """Meta's Llama-2 chat format (llama/generation.py chat_completion), per exchange:
    BOS "[INST] {user} [/INST] {assistant} " EOS, the system block inside the first [INST]
    only, user and assistant text stripped as Meta does (the system block + first user message
    is stripped as one string)."""

    name = "llama2-chat"

    def __init__(self, default_system: str | None = None, name: str | None = None):
        self.default_system = default_system
        if name:
            self.name = name

    def pieces(self, conv: Conversation) -> list[Piece]:
        system = conv.system if conv.system is not None else self.default_system
        out = []
        for t, (user, assistant) in enumerate(conv.exchanges()):
            if t == 0 and system is not None:
                user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            out += [Piece("bos", turn=t), Piece("prompt", f"[INST] {user.strip()} [/INST]", t),
                    Piece("response", f" {assistant.strip()} ", t), Piece("eos", turn=t)]
        return out


class Alpaca(PieceTemplate):
    """Stanford Alpaca prompt (header, "### Instruction:", optional "### Input:", "### Response:\\n").

    Text is not stripped (Stanford does not).  Multi-turn (our choice; Alpaca has none): one
    BOS and one header, then an Instruction/Response block per exchange, blocks separated by
    a blank line, EOS after every response (labelled), so each turn ends exactly like a
    single-turn example.  A record's system prompt replaces the header sentence.  The
    "### Input:" block is written for the turn that came with a non-empty alpaca `input`, and
    then the header is Stanford's "paired with an input" one.
    """

    name = "alpaca"

    def pieces(self, conv: Conversation) -> list[Piece]:
        header = conv.system if conv.system is not None else (ALPACA_HEADER_INPUT if conv.inputs else ALPACA_HEADER)
        out = [Piece("bos")]
        for t, (user, assistant) in enumerate(conv.exchanges()):
            if 2 * t in conv.inputs:
                instruction, inp = conv.inputs[2 * t]
                block = f"### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n"
            else:
                block = f"### Instruction:\n{user}\n\n### Response:\n"
            out += [Piece("prompt", (f"{header}\n\n" if t == 0 else "\n\n") + block, t),
                    Piece("response", assistant, t), Piece("eos", turn=t)]
        return out


class TokenizerChatTemplate(Template):
    """The HF tokenizer's own `chat_template`.  The whole conversation is rendered and tokenised
    as HF does (special-token strings in the rendering become special tokens); assistant spans
    come from rendering the conversation prefix by prefix: text between the render up to user
    turn t (with add_generation_prompt) and the render up to assistant turn t is turn t's
    response, EOS included when the template writes it there."""

    name = "tokenizer"

    @staticmethod
    def _messages(conv: Conversation) -> list[dict]:
        head = [{"role": SYSTEM, "content": conv.system}] if conv.system is not None else []
        return head + [{"role": r, "content": t} for r, t in conv.messages]

    @staticmethod
    def _check(tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'tokenizer' needs an HF tokenizer with a chat_template")

    def render(self, conv: Conversation, tokenizer=None) -> str:
        self._check(tokenizer)
        return tokenizer.apply_chat_template(self._messages(conv), tokenize=False)

    def exchanges(self, conv: Conversation, tokenizer) -> list[Exchange]:
        self._check(tokenizer)
        conv.exchanges()  # checks the roles
        msgs = self._messages(conv)
        head = len(msgs) - len(conv.messages)
        bounds, prev = [], ""
        for t in range(len(conv.messages) // 2):
            p = tokenizer.apply_chat_template(msgs[:head + 2 * t + 1], tokenize=False, add_generation_prompt=True)
            s = tokenizer.apply_chat_template(msgs[:head + 2 * t + 2], tokenize=False)
            if not (p.startswith(prev) and s.startswith(p)):
                raise ValueError("the tokenizer's chat_template does not render conversation prefixes as prefixes "
                                 "of the whole; cannot locate the assistant turns")
            bounds.append((len(p), len(s)))
            prev = s
        enc = tokenizer(prev, add_special_tokens=False, return_offsets_mapping=True)
        out: list[Exchange] = [([], []) for _ in bounds]
        t = 0
        for tid, (start, _) in zip(enc["input_ids"], enc["offset_mapping"]):
            while t < len(bounds) and start >= bounds[t][1]:
                t += 1
            if t == len(bounds):
                break  # anything the template writes after the last assistant turn
            out[t][1 if start >= bounds[t][0] else 0].append(tid)
        return out


# name -> factory.  chinese-alpaca-2 is llama2-chat with Chinese-Alpaca-2's system prompt as the
# default (its own build_instruction_dataset.py is single-turn and appends "</s>" right after the
# output, without Meta's space; we keep Meta's exact format for both).
TEMPLATES = {
    "llama2-chat": lambda: Llama2Chat(),
    "chinese-alpaca-2": lambda: Llama2Chat(LLAMA2_SYSTEM_ZH, name="chinese-alpaca-2"),
    "alpaca": lambda: Alpaca(),
    "tokenizer": lambda: TokenizerChatTemplate(),
}


def get_template(name: str | Template) -> Template:
    if isinstance(name, Template):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]()


def render(conv: Conversation, template: str | Template, tokenizer=None) -> str:
    return get_template(template).render(conv, tokenizer)


def prompt_and_reply_ids(conv: Conversation, reply: str, tokenizer,
                         template: str | Template) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids incl. EOS) of a conversation that ends on a user turn, answered by
    `reply`: the prompt is every earlier exchange and the last user turn, up to where the
    assistant's reply starts (preference pairs)."""
    full = Conversation(conv.system, conv.messages + [(ASSISTANT, reply)], conv.inputs)
    ex = get_template(template).exchanges(full, tokenizer)
    return [i for p, r in ex[:-1] for i in p + r] + ex[-1][0], ex[-1][1]


def generation_prompt_ids(conv: Conversation, tokenizer, template: str | Template) -> list[int]:
    """Token ids of a conversation that ends on a user turn, up to where the assistant's reply
    starts: rendered with a placeholder reply so the template writes the generation prompt, which
    is then cut off (RL prompts, the server's chat requests, SFT's sample prompts)."""
    return prompt_and_reply_ids(conv, "x", tokenizer, template)[0]


# A model directory records the chat template it was trained with (written by `llama-jax export`
# from the run's data.template; read by `llama-jax serve` / `chat` when --template is not given).
TEMPLATE_FILE = "llama_jax_chat.json"


def template_record(name: str) -> str:
    """The TEMPLATE_FILE text for template `name` (checked to be known)."""
    get_template(name)
    return json.dumps({"template": name}, indent=2) + "\n"


def resolve_template(name: str | None, *model_dirs, tokenizer=None) -> tuple[str, str]:
    """(template name, where it came from): `name` when given, else the one recorded in the first
    of `model_dirs` (e.g. an adapter, then its base model) that has TEMPLATE_FILE, else the
    tokenizer's own chat_template when it has one, else chinese-alpaca-2 (the SFT stage's default)."""
    if name:
        get_template(name)
        return name, "--template"
    for d in model_dirs:
        rec = recorded_template(d) if d is not None else None
        if rec:
            return rec, f"{Path(d) / TEMPLATE_FILE}"
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer", "the tokenizer's chat_template"
    return "chinese-alpaca-2", "the default"


def recorded_template(model_dir) -> str | None:
    """The template name recorded in `model_dir`/TEMPLATE_FILE, or None without the file."""
    f = Path(model_dir) / TEMPLATE_FILE
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{f}: not valid JSON ({e})") from None
    name = rec.get("template") if isinstance(rec, dict) else None
    if not isinstance(name, str) or name not in TEMPLATES:
        raise DataError(f"{f}: field 'template' is {name!r}; known: {', '.join(TEMPLATES)}")
    return name


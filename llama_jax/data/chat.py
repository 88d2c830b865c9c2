"""Supervised fine-tuning data: chat records -> conversations -> token ids with response labels.

Pipeline: `read_records` (json / jsonl files, a `datasets.Dataset`, or a list of dicts)
-> `to_conversation` (alpaca or sharegpt record -> `Conversation`, bad records raise
`RecordError`) -> `encode` (a template renders the conversation as pieces, each piece is
tokenised on its own, labels are kept on the assistant pieces and their EOS) -> batching by
`pack_examples` (bin packing with segment ids) or `bucket_batches` (length buckets).

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

Labels sit at the same positions as input_ids (HF convention; the loss shifts them).
"""
from __future__ import annotations

import abc

import json
import math
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .sources import DataError, expand

IGNORE_INDEX = -100
USER, ASSISTANT, SYSTEM = "user", "assistant", "system"

# sharegpt speaker names seen in the wild -> our three roles
ROLE_NAMES = {
    "human": USER, "user": USER,
    "gpt": ASSISTANT, "assistant": ASSISTANT, "chatgpt": ASSISTANT, "model": ASSISTANT, "bot": ASSISTANT,
    "system": SYSTEM,
}

LLAMA2_SYSTEM_ZH = "You are a helpful assistant. 你是一个乐于助人的助手。"
ALPACA_HEADER = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
ALPACA_HEADER_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.")


# ----------------------------------------------------------------------------- records

class RecordError(DataError):
    """One bad record.  `reason` is the count key (e.g. 'empty_response'), `field` the field."""

    def __init__(self, reason: str, field: str | None, detail: str):
        super().__init__(f"field '{field}': {detail}" if field else detail)
        self.reason, self.field, self.detail = reason, field, detail


@dataclass
class Conversation:
    """System prompt and turns alternating user/assistant, starting with user.

    `inputs` keeps an alpaca record's (instruction, input) split for the user message at that
    index, so the alpaca template can write its "### Input:" block; chat templates use the
    joined message text.
    """
    system: str | None
    messages: list[tuple[str, str]]
    inputs: dict[int, tuple[str, str]] = field(default_factory=dict)

    def exchanges(self) -> list[tuple[str, str]]:
        """(user, assistant) pairs; the roles must alternate from user and end on assistant."""
        m = self.messages
        roles = [r for r, _ in m]
        if not m or len(m) % 2 or roles != [USER, ASSISTANT] * (len(m) // 2):
            raise ValueError(f"conversation roles {roles} do not alternate user/assistant ending on assistant")
        return [(m[i][1], m[i + 1][1]) for i in range(0, len(m), 2)]


class Stats:
    """Counts over a load: 'records', 'examples'/'pairs', 'skipped_<reason>', 'truncated', ...

    `stats[key]` is 0 for a key never counted; `per_file[name]` holds the same counts by file.
    """

    def __init__(self):
        self.counts: Counter = Counter()
        self.per_file: dict[str, Counter] = {}

    def add(self, key: str, n: int = 1, source: str | None = None) -> None:
        if n:
            self.counts[key] += n
            if source is not None:
                self.per_file.setdefault(source, Counter())[key] += n

    def __getitem__(self, key: str) -> int:
        return self.counts.get(key, 0)

    @property
    def skipped(self) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith("skipped_"))

    def report(self) -> str:
        lines = [", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))]
        if len(self.per_file) > 1:
            lines += [f"  {name}: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items()))
                      for name, c in self.per_file.items()]
        return "\n".join(lines)

    def __repr__(self):
        return f"Stats({dict(self.counts)})"


def _str(value, field: str) -> str:
    if not isinstance(value, str):
        raise RecordError("non_string", field, f"is {type(value).__name__}, expected a string")
    return value


def _required(rec: dict, field: str, name: str | None = None):
    """rec[field]; `name` is how the error names it (its path in the record)."""
    if field not in rec or rec[field] is None:
        raise RecordError("missing_field", name or field, f"missing (fields: {', '.join(map(str, rec)) or 'none'})")
    return rec[field]


def _optional_str(rec: dict, field: str) -> str | None:
    v = rec.get(field)
    return None if v is None else _str(v, field)


def _history(rec: dict) -> list[tuple[str, str]]:
    """alpaca `history`: [[user, assistant], ...] -> messages."""
    hist = rec.get("history")
    if hist is None:
        return []
    if not isinstance(hist, list):
        raise RecordError("bad_structure", "history", f"is {type(hist).__name__}, expected a list of [user, assistant]")
    out = []
    for k, pair in enumerate(hist):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RecordError("bad_structure", f"history[{k}]", "expected a [user, assistant] pair")
        u = _str(pair[0], f"history[{k}][0]")
        a = _str(pair[1], f"history[{k}][1]")
        if not a.strip():
            raise RecordError("empty_response", f"history[{k}][1]", "the assistant reply is empty")
        out += [(USER, u), (ASSISTANT, a)]
    return out


def _alpaca_prompt(rec: dict, key: str) -> tuple[str, str, str]:
    """(user message, instruction, input): input joined on a new line (Chinese-Alpaca-2, LLaMA-Factory)."""
    instruction = _str(_required(rec, key), key)
    inp = _optional_str(rec, "input") or ""
    if not (instruction.strip() or inp.strip()):
        raise RecordError("empty_prompt", key, "instruction and input are both empty")
    return (f"{instruction}\n{inp}" if inp.strip() else instruction), instruction, inp


def _system(rec: dict, system: str | None = None) -> str | None:
    s = _optional_str(rec, "system")
    s = s if s is not None else system
    return s if s else None  # an empty system prompt is no system prompt


def message_keys(m: dict) -> tuple[str, str]:
    """("from", "value") for sharegpt messages, ("role", "content") for OpenAI-style ones."""
    openai = ("role" in m or "content" in m) and not ("from" in m or "value" in m)
    return ("role", "content") if openai else ("from", "value")


def parse_messages(convs, field: str = "conversations") -> tuple[str | None, list[tuple[str, str]]]:
    """sharegpt message list -> (system, [(role, text)]), checking roles alternate from user.

    Messages are {from, value} or {role, content}.  A system message is only allowed first.
    Empty user messages are kept (sharegpt has "press enter to continue" turns); an empty
    assistant message is a bad record.
    """
    if not isinstance(convs, list):
        raise RecordError("bad_structure", field, f"is {type(convs).__name__}, expected a list of messages")
    system, out = None, []
    for j, m in enumerate(convs):
        where = f"{field}[{j}]"
        if not isinstance(m, dict):
            raise RecordError("bad_structure", where, f"is {type(m).__name__}, expected an object")
        rkey, vkey = message_keys(m)
        role_name = _str(_required(m, rkey, f"{where}.{rkey}"), f"{where}.{rkey}")
        text = _str(_required(m, vkey, f"{where}.{vkey}"), f"{where}.{vkey}")
        role = ROLE_NAMES.get(role_name.strip().lower())
        if role is None:
            raise RecordError("unknown_role", f"{where}.{rkey}", f"unknown role {role_name!r}")
        if role == SYSTEM:
            if j != 0:
                raise RecordError("roles_out_of_order", f"{where}.{rkey}", "a system message is only allowed first")
            system = text or None
            continue
        expected = USER if len(out) % 2 == 0 else ASSISTANT
        if role != expected:
            raise RecordError("roles_out_of_order", f"{where}.{rkey}",
                              f"{role_name!r} where a {expected} turn was expected "
                              "(turns must alternate user/assistant)")
        if role == ASSISTANT and not text.strip():
            raise RecordError("empty_response", f"{where}.{vkey}", "the assistant reply is empty")
        out.append((role, text))
    return system, out


def to_conversation(rec, stats: Stats | None = None, source: str | None = None) -> Conversation:
    """alpaca {instruction, input, output[, system, history]} or sharegpt {conversations[, system]}.

    A conversation that ends on a user turn loses that turn (counted 'dropped_trailing_user');
    with no assistant turn left it is a bad record ('no_response').
    """
    if not isinstance(rec, dict):
        raise RecordError("bad_structure", "<record>", f"is {type(rec).__name__}, expected an object")
    if "conversations" in rec or "messages" in rec:
        key = "conversations" if "conversations" in rec else "messages"
        system, messages = parse_messages(_required(rec, key), key)
        system = _system(rec, system)
        if messages and messages[-1][0] == USER:
            messages = messages[:-1]
            if stats is not None:
                stats.add("dropped_trailing_user", source=source)
        if not messages:
            raise RecordError("no_response", key, "no assistant turn")
        return Conversation(system, messages)
    if "instruction" not in rec:
        raise RecordError("missing_field", "instruction",
                          f"missing: neither alpaca (instruction/output) nor sharegpt (conversations) "
                          f"(fields: {', '.join(map(str, rec)) or 'none'})")
    messages = _history(rec)
    user, instruction, inp = _alpaca_prompt(rec, "instruction")
    output = _str(_required(rec, "output"), "output")
    if not output.strip():
        raise RecordError("empty_response", "output", "the response is empty")
    inputs = {len(messages): (instruction, inp)} if inp.strip() else {}
    return Conversation(_system(rec), messages + [(USER, user), (ASSISTANT, output)], inputs)


def _read_json_file(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for a JSON array file or a JSON Lines file (some '.json' files hold lines).
    JSON Lines are streamed line by line (never the whole file in memory); an array is parsed whole."""
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("utf-8-sig", errors="ignore").lstrip()
    if not head:
        raise DataError(f"{path}: data file is empty")
    if path.suffix != ".jsonl" and head.startswith("["):
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of records, found {type(data).__name__}")
        for i, rec in enumerate(data):
            yield f"record {i}", rec
        return
    if path.suffix != ".jsonl" and not head.startswith("{"):
        raise DataError(f"{path}: not valid JSON (expected an array or JSON Lines objects)")
    i = 0
    with open(path, encoding="utf-8-sig", newline="\n") as f:  # split on \n only: U+2028 may sit inside a string
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                rec = RecordError("invalid_json", None, f"not valid JSON ({e})")
            yield f"record {i} (line {n})", rec
            i += 1


def read_records(paths_or_dataset) -> Iterator[tuple[str, str, object]]:
    """(source name, where in it, record) from json/jsonl paths (globs allowed), a
    `datasets.Dataset`, or a list of dicts.  An unparsable JSON line comes as a RecordError."""
    if isinstance(paths_or_dataset, (str, Path)) or (
            isinstance(paths_or_dataset, (list, tuple)) and paths_or_dataset
            and all(isinstance(p, (str, Path)) for p in paths_or_dataset)):
        for p in expand([str(x) for x in ([paths_or_dataset] if isinstance(paths_or_dataset, (str, Path))
                                          else paths_or_dataset)]):
            for where, rec in _read_json_file(Path(p)):
                yield p, where, rec
        return
    name = "<records>"
    info = getattr(paths_or_dataset, "info", None)
    if info is not None:
        name = f"<dataset {getattr(info, 'dataset_name', None) or ''}>".replace(" >", ">")
    for i, rec in enumerate(paths_or_dataset):
        yield name, f"record {i}", rec


def iter_records(paths_or_dataset, parse, stats: Stats, on_error: str = "skip"):
    """Yield (source, parse(record, stats, source)) for good records; bad ones are counted
    'skipped_<reason>' or, with on_error='error', raise DataError naming file, record, field."""
    if on_error not in ("skip", "error"):
        raise ValueError(f"on_error must be 'skip' or 'error', not {on_error!r}")
    for source, where, rec in read_records(paths_or_dataset):
        stats.add("records", source=source)
        try:
            if isinstance(rec, RecordError):
                raise rec
            item = parse(rec, stats, source)
        except RecordError as e:
            if on_error == "error":
                raise DataError(f"{source}: {where}: {e}") from None
            stats.add(f"skipped_{e.reason}", source=source)
            continue
        yield source, item


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


def generation_prompt_ids(conv: Conversation, tokenizer, template: str | Template) -> list[int]:
    """Token ids of a conversation that ends on a user turn, up to where the assistant's reply
    starts: rendered with a placeholder reply so the template writes the generation prompt, which
    is then cut off (PPO's prompts, the server's chat requests)."""
    full = Conversation(conv.system, conv.messages + [(ASSISTANT, "x")], conv.inputs)
    ex = get_template(template).exchanges(full, tokenizer)
    return [i for p, r in ex[:-1] for i in p + r] + ex[-1][0]


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


# ----------------------------------------------------------------------------- encoding

@dataclass
class EncodedExample:
    input_ids: np.ndarray  # [L] int32
    labels: np.ndarray     # [L] int32, IGNORE_INDEX outside assistant turns (+ their EOS)

    def __len__(self):
        return len(self.input_ids)


def encode(conv: Conversation, tokenizer, template: str | Template, max_length: int,
           stats: Stats | None = None, source: str | None = None) -> EncodedExample | None:
    """Token ids and labels; None when even the first prompt leaves no room for a response.

    Too long: trailing whole exchanges are dropped ('truncated_turns' counts the dropped
    assistant turns); if the first exchange alone does not fit, its response is cut, keeping
    at least one token and losing its EOS ('truncated'); if its prompt alone fills max_length
    the example is dropped ('skipped_too_long').
    """
    stats = stats if stats is not None else Stats()
    exs = get_template(template).exchanges(conv, tokenizer)
    total, keep = 0, 0
    for p, r in exs:
        if total + len(p) + len(r) > max_length:
            break
        total += len(p) + len(r)
        keep += 1
    if keep == 0:
        p, r = exs[0]
        if len(p) >= max_length:
            stats.add("skipped_too_long", source=source)
            return None
        exs = [(p, r[:max_length - len(p)])]
        stats.add("truncated", source=source)
    else:
        stats.add("truncated_turns", len(exs) - keep, source=source)
        exs = exs[:keep]
    ids = [i for p, r in exs for i in p + r]
    labels = [x for p, r in exs for x in [IGNORE_INDEX] * len(p) + r]
    return EncodedExample(np.asarray(ids, np.int32), np.asarray(labels, np.int32))


def load_sft(paths_or_dataset, tokenizer, template: str | Template, max_length: int,
             on_error: str = "skip") -> tuple[list[EncodedExample], Stats]:
    """Encoded examples of every usable record, and the counts of what was skipped or cut."""
    template = get_template(template)
    stats = Stats()
    out = []
    for source, conv in iter_records(paths_or_dataset, to_conversation, stats, on_error):
        ex = encode(conv, tokenizer, template, max_length, stats, source)
        if ex is not None:
            out.append(ex)
            stats.add("examples", source=source)
    if not stats["records"]:
        raise DataError("no records to load")
    return out, stats


# ----------------------------------------------------------------------------- batching

def pack_examples(examples: list[EncodedExample], block_size: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Rows of block_size holding whole examples, placed first-fit-decreasing.

    Returns int32 [N, block_size] arrays: tokens, labels (IGNORE_INDEX on padding), segments
    (1, 2, ... per example within a row, 0 = padding) and positions (restarting per example),
    the layout pretraining's `PackedBlocks` uses, so the same segment-masked attention applies.
    """
    lengths = [len(e) for e in examples]
    if any(n > block_size for n in lengths):
        raise ValueError(f"an example of {max(lengths)} tokens does not fit block_size {block_size}")
    n = len(examples)
    # max-segment tree over row capacities; rows not yet opened have full capacity and come
    # after every opened row, so "leftmost row with room" is exactly first fit.
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = [0] * size + [block_size] * n + [0] * (size - n)
    for i in range(size - 1, 0, -1):
        tree[i] = max(tree[2 * i], tree[2 * i + 1])
    rows: list[list[int]] = []
    for i in sorted(range(n), key=lambda k: (-lengths[k], k)):
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= lengths[i] else 2 * node + 1
        r = node - size
        if r == len(rows):
            rows.append([])
        rows[r].append(i)
        tree[node] -= lengths[i]
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    shape = (len(rows), block_size)
    out = {"tokens": np.full(shape, pad_id, np.int32), "labels": np.full(shape, IGNORE_INDEX, np.int32),
           "segments": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32)}
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members, 1):
            e, L = examples[i], lengths[i]
            out["tokens"][r, at:at + L] = e.input_ids
            out["labels"][r, at:at + L] = e.labels
            out["segments"][r, at:at + L] = s
            out["positions"][r, at:at + L] = np.arange(L)
            at += L
    return out


def bucket_batches(examples: list[EncodedExample], batch_size: int, seed: int, multiple: int = 64,
                   pad_id: int = 0, drop_last: bool = False) -> list[dict[str, np.ndarray]]:
    """Batches of similar length: examples sorted by length (seeded tie-break), cut into
    batches of batch_size, batch order shuffled by seed; each batch right-padded to its own
    longest example rounded up to `multiple` (few distinct shapes for jit).  The last batch
    may be smaller unless drop_last.  Same keys as `pack_examples`, one example per row."""
    rng = np.random.default_rng(seed)
    lengths = np.array([len(e) for e in examples])
    order = np.lexsort((rng.random(len(examples)), lengths))
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and groups and len(groups[-1]) < batch_size:
        groups.pop()
    batches = []
    for g in (groups[k] for k in rng.permutation(len(groups))):
        T = multiple * math.ceil(int(lengths[g].max()) / multiple)
        shape = (len(g), T)
        b = {"tokens": np.full(shape, pad_id, np.int32), "labels": np.full(shape, IGNORE_INDEX, np.int32),
             "segments": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32)}
        for row, i in enumerate(g):
            L = lengths[i]
            b["tokens"][row, :L] = examples[i].input_ids
            b["labels"][row, :L] = examples[i].labels
            b["segments"][row, :L] = 1
            b["positions"][row, :L] = np.arange(L)
        batches.append(b)
    return batches


def padding_fraction(batches: dict | Iterable[dict]) -> float:
    """Share of padding slots (segment 0) in a rows dict or a list of batches."""
    batches = [batches] if isinstance(batches, dict) else list(batches)
    pad = sum(int((b["segments"] == 0).sum()) for b in batches)
    total = sum(b["segments"].size for b in batches)
    return pad / total if total else 0.0


def naive_padding_fraction(examples: list[EncodedExample], max_length: int) -> float:
    """Padding share when every example is padded to max_length (the baseline)."""
    return 1.0 - sum(len(e) for e in examples) / (len(examples) * max_length) if examples else 0.0

"""Chat records: json / jsonl files, a `datasets.Dataset` or a list of dicts -> `Conversation`s.

Contract:
* `read_records` yields (source name, where in it, record) for json / jsonl paths (globs allowed;
  JSON Lines streamed line by line), a `datasets.Dataset` or a list of dicts; an unparsable JSON
  line comes as a `RecordError` in place of the record.
* `iter_records(paths, parse, stats, on_error)` runs a parser over them: good records are
  yielded, a bad one (the parser raises `RecordError`) is counted 'skipped_<reason>' in `Stats`
  or, with on_error='error', raises `DataError` naming file, record and field.
* Parsers: `to_conversation` (an alpaca or sharegpt SFT record, ending on an assistant turn) and
  `prompt_conversation` (a record's prompt, ending on a user turn: RL prompts).  Other record
  formats (`data.preference`) are built from the same public field readers: `str_field`,
  `required_field`, `optional_str_field`, `history_messages`, `alpaca_prompt`, `system_prompt`,
  `message_keys`, `parse_messages`; every one raises `RecordError` with a count key and the field.

A `Conversation` is roles and text only: rendering it to tokens is `data.templates`' job.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .sources import DataError, expand

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"

# sharegpt speaker names seen in the wild -> our three roles
ROLE_NAMES = {
    "human": USER, "user": USER,
    "gpt": ASSISTANT, "assistant": ASSISTANT, "chatgpt": ASSISTANT, "model": ASSISTANT, "bot": ASSISTANT,
    "system": SYSTEM,
}


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


def str_field(value, field: str) -> str:
    """`value`, which must be a string ('non_string' otherwise); `field` names it in the error."""
    if not isinstance(value, str):
        raise RecordError("non_string", field, f"is {type(value).__name__}, expected a string")
    return value


def required_field(rec: dict, field: str, name: str | None = None):
    """rec[field]; `name` is how the error names it (its path in the record)."""
    if field not in rec or rec[field] is None:
        raise RecordError("missing_field", name or field, f"missing (fields: {', '.join(map(str, rec)) or 'none'})")
    return rec[field]


def optional_str_field(rec: dict, field: str) -> str | None:
    """rec[field] as a string, or None when absent or null."""
    v = rec.get(field)
    return None if v is None else str_field(v, field)


def history_messages(rec: dict) -> list[tuple[str, str]]:
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
        u = str_field(pair[0], f"history[{k}][0]")
        a = str_field(pair[1], f"history[{k}][1]")
        if not a.strip():
            raise RecordError("empty_response", f"history[{k}][1]", "the assistant reply is empty")
        out += [(USER, u), (ASSISTANT, a)]
    return out


def alpaca_prompt(rec: dict, key: str) -> tuple[str, str, str]:
    """(user message, instruction, input): input joined on a new line (Chinese-Alpaca-2, LLaMA-Factory)."""
    instruction = str_field(required_field(rec, key), key)
    inp = optional_str_field(rec, "input") or ""
    if not (instruction.strip() or inp.strip()):
        raise RecordError("empty_prompt", key, "instruction and input are both empty")
    return (f"{instruction}\n{inp}" if inp.strip() else instruction), instruction, inp


def system_prompt(rec: dict, system: str | None = None) -> str | None:
    """The record's `system` field, else `system` (e.g. a sharegpt system message); empty -> None."""
    s = optional_str_field(rec, "system")
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
        role_name = str_field(required_field(m, rkey, f"{where}.{rkey}"), f"{where}.{rkey}")
        text = str_field(required_field(m, vkey, f"{where}.{vkey}"), f"{where}.{vkey}")
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
        system, messages = parse_messages(required_field(rec, key), key)
        system = system_prompt(rec, system)
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
    messages = history_messages(rec)
    user, instruction, inp = alpaca_prompt(rec, "instruction")
    output = str_field(required_field(rec, "output"), "output")
    if not output.strip():
        raise RecordError("empty_response", "output", "the response is empty")
    inputs = {len(messages): (instruction, inp)} if inp.strip() else {}
    return Conversation(system_prompt(rec), messages + [(USER, user), (ASSISTANT, output)], inputs)


def prompt_conversation(rec, stats: Stats | None = None, source: str | None = None) -> Conversation:
    """A record's prompt: sharegpt messages up to the last user turn (any trailing reply dropped),
    or an alpaca / preference record's instruction (+ input, history, system)."""
    if not isinstance(rec, dict):
        raise RecordError("bad_structure", "<record>", f"is {type(rec).__name__}, expected an object")
    if "conversations" in rec or "messages" in rec:
        key = "conversations" if "conversations" in rec else "messages"
        system, messages = parse_messages(rec[key], key)
        while messages and messages[-1][0] == ASSISTANT:
            messages = messages[:-1]
        if not messages:
            raise RecordError("empty_prompt", key, "no user turn")
        return Conversation(system_prompt(rec, system), messages)
    key = next((k for k in ("prompt", "question", "instruction") if k in rec), None)
    if key is None:
        raise RecordError("missing_field", "prompt", "missing: none of prompt, question, instruction or "
                          f"conversations (fields: {', '.join(map(str, rec)) or 'none'})")
    messages = history_messages(rec)
    user, instruction, inp = alpaca_prompt(rec, key)
    inputs = {len(messages): (instruction, inp)} if inp.strip() else {}
    return Conversation(system_prompt(rec), messages + [(USER, user)], inputs)


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


def load_encoded(paths_or_dataset, parse, encode, kind: str, on_error: str = "skip") -> tuple[list, Stats]:
    """Every usable record: parsed (`parse(rec, stats, source)`, as iter_records), then encoded
    (`encode(item, stats, source)`, None = skipped, counted by `encode`), each counted as `kind`.
    Returns (the encoded items, the counts); a DataError when there were no records at all."""
    stats = Stats()
    out = []
    for source, item in iter_records(paths_or_dataset, parse, stats, on_error):
        enc = encode(item, stats, source)
        if enc is not None:
            out.append(enc)
            stats.add(kind, source=source)
    if not stats["records"]:
        raise DataError("no records to load")
    return out, stats


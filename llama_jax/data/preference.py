"""Preference pairs (reward model, DPO): records -> prompt / chosen / rejected token ids -> batches.

Record formats (one file may mix them):
* {prompt | question | instruction [, input], chosen | response_chosen, rejected | response_rejected}
  with string values, optional `system` and alpaca `history` ([[user, assistant], ...]);
* sharegpt: {conversations: [{from, value}, ...] ending on a user turn, chosen, rejected}, where
  chosen/rejected are a message {from, value} or a string;
* ranked: {instruction[, input], output: [best, second, ...][, history]}: output[0] is chosen
  and output[1] rejected (one pair per record, as the source repositories do).

The prompt is rendered with the same templates as SFT (`templates.get_template`), so a pair's
prompt ids + chosen ids are exactly what `sft_examples.encode` gives for the conversation ending
in the chosen reply; response ids end with EOS.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .records import (ASSISTANT, ROLE_NAMES, USER, Conversation, RecordError, Stats, alpaca_prompt,
                      history_messages, load_encoded, message_keys, parse_messages, required_field, str_field,
                      system_prompt)
from .templates import Template, get_template, prompt_and_reply_ids

PROMPT_KEYS = ("prompt", "question", "instruction")
CHOSEN_KEYS = ("chosen", "response_chosen")
REJECTED_KEYS = ("rejected", "response_rejected")


@dataclass
class Preference:
    conversation: Conversation  # ends on the user turn both responses answer
    chosen: str
    rejected: str


@dataclass
class PairExample:
    prompt_ids: np.ndarray    # [P] int32, BOS first
    chosen_ids: np.ndarray    # [C] int32, ends with EOS unless truncated
    rejected_ids: np.ndarray  # [R] int32


def _response(rec: dict, keys: tuple[str, ...]) -> str:
    key = next((k for k in keys if k in rec), keys[0])
    v = required_field(rec, key)
    if isinstance(v, dict):  # sharegpt message {from, value}
        rkey, vkey = message_keys(v)
        if rkey in v and ROLE_NAMES.get(str(v[rkey]).strip().lower()) != ASSISTANT:
            raise RecordError("roles_out_of_order", f"{key}.{rkey}", f"{v[rkey]!r}, expected an assistant reply")
        text = str_field(required_field(v, vkey, f"{key}.{vkey}"), f"{key}.{vkey}")
        key = f"{key}.{vkey}"
    else:
        text = str_field(v, key)
    if not text.strip():
        raise RecordError("empty_response", key, "the response is empty")
    return text


def to_preference(rec, stats: Stats | None = None, source: str | None = None) -> Preference:
    """Any of the module's record formats -> Preference (bad records raise RecordError)."""
    if not isinstance(rec, dict):
        raise RecordError("bad_structure", "<record>", f"is {type(rec).__name__}, expected an object")
    inputs = {}
    if "conversations" in rec:
        system, messages = parse_messages(rec["conversations"], "conversations")
        system = system_prompt(rec, system)
        if not messages:
            raise RecordError("empty_prompt", "conversations", "no user turn")
        if messages[-1][0] != USER:
            raise RecordError("roles_out_of_order", f"conversations[{len(rec['conversations']) - 1}]",
                              "the prompt conversation must end on a user turn")
        chosen, rejected = _response(rec, CHOSEN_KEYS), _response(rec, REJECTED_KEYS)
    else:
        key = next((k for k in PROMPT_KEYS if k in rec), None)
        if key is None:
            raise RecordError("missing_field", "prompt", f"missing: none of {', '.join(PROMPT_KEYS)} or conversations "
                              f"(fields: {', '.join(map(str, rec)) or 'none'})")
        messages = history_messages(rec)
        user, instruction, inp = alpaca_prompt(rec, key)
        if inp.strip():
            inputs = {len(messages): (instruction, inp)}
        messages.append((USER, user))
        system = system_prompt(rec)
        if not any(k in rec for k in CHOSEN_KEYS) and isinstance(rec.get("output"), list):
            ranked = rec["output"]
            if len(ranked) < 2:
                raise RecordError("too_few_responses", "output", f"{len(ranked)} ranked response(s), need 2")
            chosen, rejected = (str_field(ranked[i], f"output[{i}]") for i in (0, 1))
            for i, text in enumerate((chosen, rejected)):
                if not text.strip():
                    raise RecordError("empty_response", f"output[{i}]", "the response is empty")
        else:
            chosen, rejected = _response(rec, CHOSEN_KEYS), _response(rec, REJECTED_KEYS)
    if chosen.strip() == rejected.strip():
        raise RecordError("identical_responses", "rejected", "chosen and rejected are the same text")
    return Preference(Conversation(system, messages, inputs), chosen, rejected)


def encode_pair(pref: Preference, tokenizer, template: str | Template, max_length: int,
                max_prompt_length: int | None = None, stats: Stats | None = None,
                source: str | None = None) -> PairExample | None:
    """Prompt ids and both response ids, with len(prompt) + len(longer response) <= max_length.

    Too long: the prompt is cut from the left to max(max_prompt_length, room left by the longer
    response) keeping BOS and the end (where the question is) ('truncated_prompt'); if still too
    long, both responses are cut to the room left ('truncated_response').  max_prompt_length
    defaults to max_length // 2.  A pair whose responses become identical is dropped
    ('skipped_identical_after_truncation'): it has no preference left to learn.
    """
    template = get_template(template)
    stats = stats if stats is not None else Stats()
    max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"max_prompt_length {max_prompt_length} must be in (0, max_length={max_length})")
    prompt, chosen = prompt_and_reply_ids(pref.conversation, pref.chosen, tokenizer, template)
    prompt_r, rejected = prompt_and_reply_ids(pref.conversation, pref.rejected, tokenizer, template)
    if prompt_r != prompt:
        raise ValueError(f"template {template.name!r} encodes the prompt differently for the two responses")
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > max_length:
        keep = max(max_prompt_length, max_length - longest)
        if len(prompt) > keep:
            bos = getattr(tokenizer, "bos_token_id", None)
            head = prompt[:1] if bos is not None and prompt[0] == bos else []
            prompt = head + prompt[len(prompt) - (keep - len(head)):]
            stats.add("truncated_prompt", source=source)
        room = max_length - len(prompt)
        if longest > room:
            chosen, rejected = chosen[:room], rejected[:room]
            stats.add("truncated_response", source=source)
            if chosen == rejected:
                stats.add("skipped_identical_after_truncation", source=source)
                return None
    return PairExample(np.asarray(prompt, np.int32), np.asarray(chosen, np.int32), np.asarray(rejected, np.int32))


def load_pairs(paths, tokenizer, template: str | Template, max_length: int, on_error: str = "skip",
               max_prompt_length: int | None = None) -> tuple[list[PairExample], Stats]:
    """Encoded pairs of every usable record and the counts ('records', 'pairs', 'skipped_*', ...)."""
    template = get_template(template)
    return load_encoded(paths, to_preference,
                        lambda pref, stats, source: encode_pair(pref, tokenizer, template, max_length,
                                                                max_prompt_length, stats, source),
                        "pairs", on_error)


def pair_batch(pairs: list[PairExample], pad_id: int, multiple: int = 1) -> dict[str, np.ndarray]:
    """[2B, T] right-padded int32 arrays: rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected.

    input_ids (pad_id after the end), attention_mask (1 on real tokens), loss_mask (1 on the
    response tokens incl. EOS, at the tokens' own positions: the log-prob of token t comes from
    the logits at t-1).  T is the longest row rounded up to `multiple`.
    """
    if not pairs:
        raise ValueError("pair_batch needs at least one pair")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    T = max(len(a) + len(b) for a, b in rows)
    T = -(-T // multiple) * multiple
    out = {"input_ids": np.full((len(rows), T), pad_id, np.int32),
           "attention_mask": np.zeros((len(rows), T), np.int32),
           "loss_mask": np.zeros((len(rows), T), np.int32)}
    for i, (prompt, resp) in enumerate(rows):
        n, m = len(prompt), len(resp)
        out["input_ids"][i, :n] = prompt
        out["input_ids"][i, n:n + m] = resp
        out["attention_mask"][i, :n + m] = 1
        out["loss_mask"][i, n:n + m] = 1
    return out

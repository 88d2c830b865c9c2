"""SFT examples: conversations -> token ids with response labels -> batches.

Pipeline: `data.records` (`iter_records` + `to_conversation`: alpaca / sharegpt records ->
`Conversation`) -> `encode` (the template's exchanges, `data.templates`: each piece tokenised on
its own, labels kept on the assistant pieces and their EOS; too long: trailing exchanges dropped,
then the first response cut) -> batching by `pack_examples` (bin packing with segment ids) or
`bucket_batches` (length buckets).  `load_sft` is records -> encoded examples + `Stats`.

Labels sit at the same positions as input_ids (HF convention; the loss shifts them), IGNORE_INDEX
outside the assistant turns.  Batches are int32 tokens / labels / segments / positions, the layout
pretraining's `PackedBlocks` uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .records import Conversation, Stats, load_encoded, to_conversation
from .templates import Template, get_template

IGNORE_INDEX = -100


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
    return load_encoded(paths_or_dataset, to_conversation,
                        lambda conv, stats, source: encode(conv, tokenizer, template, max_length, stats, source),
                        "examples", on_error)


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

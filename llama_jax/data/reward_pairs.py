"""Preference pairs for a reward model: encoded pairs with a per-pair margin, and their batches.

A batch holds right-padded chosen / rejected rows of one width (the global batch's longest, rounded
up to `multiple`), each pair's margin (record field, 0 when absent) and weight (0 marks the filler
pairs that complete the last held-out batch).  Training batches are `packing.StepIndexedBatches`
over the pairs with `collate` below; held-out batches are every pair once (`pair_eval_batches`).
"""
from __future__ import annotations

import math

import numpy as np

from .preference import PairExample, encode_pair, pair_batch, to_preference
from .records import RecordError, Stats, load_encoded
from .templates import get_template


def load_rm_pairs(paths, tok, template, max_length, max_prompt_length=None, margin_field="margin",
                  on_error="skip") -> tuple[list[PairExample], np.ndarray, Stats]:
    """Encoded pairs plus each pair's margin (record field `margin_field`, 0 when absent)."""
    template = get_template(template)

    def parse(rec, stats, source):
        pref = to_preference(rec, stats, source)
        m = rec.get(margin_field) if margin_field else None
        if m is None:
            return pref, 0.0
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise RecordError("bad_margin", margin_field, f"{m!r} is not a finite number")
        return pref, float(m)

    def encode(item, stats, source):
        pref, m = item
        pair = encode_pair(pref, tok, template, max_length, max_prompt_length, stats, source)
        return None if pair is None else (pair, m)

    out, stats = load_encoded(paths, parse, encode, "pairs", on_error)
    return [p for p, _ in out], np.asarray([m for _, m in out], np.float32), stats


def collate(pairs, margins, weights, pad_id: int, multiple: int = 1) -> dict[str, np.ndarray]:
    """[B, T] right-padded chosen / rejected rows (one T for both) + margin and weight [B]."""
    b = pair_batch(pairs, pad_id, multiple)
    B = len(pairs)
    return {"chosen_ids": b["input_ids"][:B], "chosen_mask": b["attention_mask"][:B],
            "rejected_ids": b["input_ids"][B:], "rejected_mask": b["attention_mask"][B:],
            "margin": np.asarray(margins, np.float32), "weight": np.asarray(weights, np.float32)}


def pair_eval_batches(pairs, margins, G, pad_id, multiple, host=0, num_hosts=1, limit=None):
    """Every held-out pair in global batches of G; the last is filled with weight-0 copies."""
    out = []
    per = G // num_hosts
    for b0 in range(0, len(pairs), G):
        if limit is not None and len(out) >= limit:
            break
        idx = list(range(b0, min(b0 + G, len(pairs))))
        w = [1.0] * len(idx) + [0.0] * (G - len(idx))
        idx += [idx[0]] * (G - len(idx))
        b = collate([pairs[i] for i in idx], margins[idx], w, pad_id, multiple)
        out.append({k: v[host * per:(host + 1) * per] for k, v in b.items()})
    return out

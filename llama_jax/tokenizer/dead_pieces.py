"""Dead pieces: vocabulary entries that BPE can never produce.

sentencepiece BPE starts from single characters and only ever joins two adjacent symbols
whose concatenation is a piece. A multi-character NORMAL piece is therefore *dead* when
no split of it into two NORMAL pieces exists: its embedding row would never be trained.
Single characters, byte pieces and special (control / user-defined) pieces are never dead.

Components must themselves be pieces. (sentencepiece would also join two characters that
are not pieces, but the HF `tokenizers` BPE turns such characters into byte-fallback tokens
first, so counting them would make the two libraries disagree.) When every multi-character
piece has a split into two pieces, every piece is reachable by induction on its length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection

from .sp_model import NORMAL, ModelProto


def mergeable_pieces(proto: ModelProto) -> set[str]:
    """Pieces that BPE can build and use as merge components."""
    return {p.piece for p in proto.pieces if p.type == NORMAL}


def has_split(piece: str, vocab: Collection[str]) -> bool:
    return any(piece[:k] in vocab and piece[k:] in vocab for k in range(1, len(piece)))


def find_dead_pieces(proto: ModelProto, start_id: int = 0) -> list[tuple[int, str]]:
    """(id, piece) of every dead piece with id >= start_id, in id order."""
    vocab = mergeable_pieces(proto)
    return [
        (i, p.piece)
        for i, p in enumerate(proto.pieces)
        if i >= start_id and p.type == NORMAL and len(p.piece) > 1 and not has_split(p.piece, vocab)
    ]


def find_unreachable_pieces(proto: ModelProto) -> list[tuple[int, str]]:
    """Stricter count: pieces with no chain of splits down to single-character pieces.

    A piece whose only split uses a dead piece is not dead by the one-step rule above but
    still can never be produced. Used by the report to explain counts from other tools.
    """
    live = live_pieces(mergeable_pieces(proto))
    return [(i, p.piece) for i, p in enumerate(proto.pieces) if p.type == NORMAL and p.piece not in live]


def live_pieces(vocab: Collection[str]) -> set[str]:
    """Pieces reachable from single-character pieces through splits into two pieces."""
    live = {s for s in vocab if len(s) == 1}
    for s in sorted((s for s in vocab if len(s) > 1), key=len):
        # Both halves are shorter, so one pass in length order reaches the fixpoint.
        if has_split(s, live):
            live.add(s)
    return live


@dataclasses.dataclass
class RepairPlan:
    added: list[str]  # intermediate pieces to append, in order (parts before wholes)
    dropped: list[str]  # pieces to remove (dead and, in repair mode, not repairable)


def plan_repair(
    proto: ModelProto, mode: str, protected_ids: int, allowed: Callable[[str], bool] = lambda s: True
) -> RepairPlan:
    """What to change so that every piece with id >= protected_ids can be produced.

    mode "keep": nothing. "drop": remove every piece that cannot be produced (a piece
    built only from dead pieces goes too). "repair": add the fewest missing intermediate
    pieces; only pieces for which `allowed` is true may be added, and a piece that cannot
    be repaired that way is dropped. Pieces below `protected_ids` (the base) are untouched.
    """
    if mode not in ("keep", "drop", "repair"):
        raise ValueError(f"unknown dead-piece mode {mode!r} (keep, drop or repair)")
    if mode == "keep":
        return RepairPlan([], [])
    vocab = mergeable_pieces(proto)
    live = live_pieces(vocab)
    new = [p.piece for i, p in enumerate(proto.pieces) if i >= protected_ids and p.type == NORMAL]
    added: list[str] = []
    if mode == "repair":
        for piece in new:
            if piece in live:
                continue
            additions = _cheapest_additions(piece, vocab, live, allowed)
            if additions is None:
                continue  # dropped below
            for s in additions:
                if s not in vocab:
                    vocab.add(s)
                    added.append(s)
                live.add(s)
    dropped = [s for s in new if s not in live]
    return RepairPlan(added, dropped)


_IMPOSSIBLE = (float("inf"), 0)


def _cheapest_additions(
    piece: str, vocab: set[str], live: set[str], allowed: Callable[[str], bool]
) -> list[str] | None:
    """Pieces to add/make live (bottom-up) so that `piece` becomes live; None if impossible.

    Cost = number of pieces not yet in the vocabulary; on equal cost prefer the split whose
    already-live half is longest, e.g. 中华人民共和国 -> 中华人民 + 共和国 (add 共和国).
    """
    memo: dict[str, tuple[float, int]] = {}  # substring -> (cost, best split)

    def cost(s: str) -> float:
        if s in live:
            return 0
        if s in memo:
            return memo[s][0]
        if s not in vocab and not allowed(s):
            memo[s] = _IMPOSSIBLE
            return _IMPOSSIBLE[0]
        own = 0 if s in vocab else 1
        if len(s) == 1:
            memo[s] = (own, 0)
            return own
        best = _IMPOSSIBLE
        best_key = None
        for k in range(1, len(s)):
            c = cost(s[:k]) + cost(s[k:])
            longest_live = max(len(h) for h in (s[:k], s[k:]) if h in live) if (s[:k] in live or s[k:] in live) else 0
            key = (c, -longest_live)
            if best_key is None or key < best_key:
                best_key, best = key, (own + c, k)
        memo[s] = best
        return best[0]

    if cost(piece) == float("inf"):
        return None
    order: list[str] = []

    def collect(s: str) -> None:
        if s in live or s in order:
            return
        k = memo[s][1]
        if len(s) > 1:
            collect(s[:k])
            collect(s[k:])
        order.append(s)

    collect(piece)
    return order

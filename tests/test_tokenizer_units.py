"""Unit tests of the tokenizer package on small synthetic models (plus one resize check on LLaMA-2)."""

from __future__ import annotations

import numpy as np
import pytest

from llama_jax.tokenizer import (
    MergeOptions,
    default_data_dir,
    find_dead_pieces,
    find_unreachable_pieces,
    init_new_rows,
    load_model_proto,
    merge_model_protos,
    plan_repair,
)
from llama_jax.fsutil import atomic_output_dir
from llama_jax.tokenizer.chinese import has_chinese, is_chinese_char
from llama_jax.tokenizer.hf_files import UnsupportedNormalizerError, build_hf_tokenizer
from llama_jax.tokenizer.merge import _descending_float32_scores, read_word_list
from llama_jax.tokenizer.sp_model import (
    BPE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    ModelProto,
    Piece,
)

DATA = default_data_dir()
LLAMA2 = DATA / "llama2-tokenizer" / "tokenizer.model"


def make_proto(pieces: list[str]) -> ModelProto:
    """A BPE ModelProto with <unk> <s> </s> and NORMAL pieces scored by rank (like LLaMA)."""
    proto = ModelProto()
    proto.trainer_spec.model_type = BPE
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    for text, kind in (("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL)):
        proto.pieces.append(Piece(piece=text, type=kind, score=0.0))
    for rank, text in enumerate(pieces):
        proto.pieces.append(Piece(piece=text, type=NORMAL, score=-float(rank)))
    return proto


def texts(proto: ModelProto, start: int = 0) -> list[str]:
    return [p.piece for p in proto.pieces[start:]]


# --- dead pieces -------------------------------------------------------------------


def test_dead_piece_needs_a_split_into_two_pieces():
    proto = make_proto(["a", "b", "c", "ab", "abc", "bd", "xyz"])
    assert find_dead_pieces(proto) == [(8, "bd"), (9, "xyz")]  # 'd', 'xy', 'yz' are no pieces


def test_unreachable_includes_pieces_built_only_on_dead_pieces():
    proto = make_proto(["x", "y", "z", "w", "xyz", "xyzw"])
    assert find_dead_pieces(proto) == [(7, "xyz")]  # xyzw = xyz + w passes the one-step rule
    assert find_unreachable_pieces(proto) == [(7, "xyz"), (8, "xyzw")]


def test_repair_adds_the_fewest_intermediate_pieces():
    base = ["中", "华", "人", "民", "共", "和", "国", "中华", "人民", "中华人民", "共和"]
    proto = make_proto(base + ["中华人民共和国"])
    plan = plan_repair(proto, "repair", protected_ids=3 + len(base))
    assert plan.added == ["共和国"] and plan.dropped == []


def test_repair_only_adds_allowed_pieces_and_drops_the_rest():
    base = ["G", "D", "P", "增", "长", "增长", "，"]
    proto = make_proto(base + ["GDP增长", "℃，"])  # '℃' is not a piece and not Chinese
    plan = plan_repair(proto, "repair", protected_ids=3 + len(base), allowed=has_chinese)
    assert plan.added and all(has_chinese(s) for s in plan.added)
    assert plan.dropped == ["℃，"]
    repaired = make_proto(base + ["GDP增长"] + plan.added)
    assert find_unreachable_pieces(repaired) == []


def test_drop_removes_dead_pieces_and_pieces_built_on_them():
    proto = make_proto(["x", "y", "z", "w", "xy", "xyz", "wq", "xyzw"])
    # 'wq' is dead ('q' is no piece) and nothing depends on it; the others are live.
    assert plan_repair(proto, "drop", protected_ids=3).dropped == ["wq"]
    proto = make_proto(["x", "y", "z", "w", "xyz", "xyzw", "xyzwx"])
    assert plan_repair(proto, "drop", protected_ids=3).dropped == ["xyz", "xyzw", "xyzwx"]


def test_keep_changes_nothing_and_base_pieces_are_protected():
    proto = make_proto(["x", "y", "xyz"])
    assert plan_repair(proto, "keep", protected_ids=3).dropped == []
    assert plan_repair(proto, "drop", protected_ids=len(proto.pieces)).dropped == []
    with pytest.raises(ValueError):
        plan_repair(proto, "fix-it", protected_ids=3)


# --- merging -------------------------------------------------------------------------


def test_merge_appends_new_chinese_pieces_in_source_order_below_base_scores():
    base = make_proto(["▁", "t", "h", "e", "▁t", "he", "▁the", "中", "国", "人"])
    base_size = len(base.pieces)
    add = make_proto(["中", "国", "中国", "人", "中国人", "he", "GDP", "G", "▁中国"])
    add.pieces.append(Piece(piece="<sep>", type=USER_DEFINED))
    result = merge_model_protos(base, add, MergeOptions(add_words=("人工智能", "中国", "abc")))
    merged = result.proto
    assert texts(merged, 0)[:base_size] == texts(base)
    assert [p.score for p in merged.pieces[:base_size]] == [p.score for p in base.pieces]
    # '▁中国' = '▁' + '中国'; '人工智能' needs intermediates (repair); pieces without a
    # Chinese character (GDP, G, <sep>, abc) are skipped, 'he' and '中国' already exist.
    new = texts(merged, base_size)
    assert new[:4] == ["中国", "中国人", "▁中国", "人工智能"]
    assert new[4:] == result.repair_added and all(has_chinese(s) for s in new[4:])
    assert result.skipped_non_chinese == 4
    assert (result.added_from_model, result.added_words) == (3, 1)
    scores = [p.score for p in merged.pieces[base_size:] if p.type == NORMAL]
    assert max(scores) < min(p.score for p in base.pieces[3:])
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert find_unreachable_pieces(merged) == []


def test_merge_pad_token_and_fillers():
    base = make_proto(["a", "b", "ab"])
    add = make_proto(["中", "国", "中国"])
    result = merge_model_protos(base, add, MergeOptions(pad_token=True, pad_to_multiple_of=8))
    merged = result.proto
    assert merged.pieces[6].piece == "<pad>" and merged.pieces[6].type == USER_DEFINED
    assert result.pad_id == merged.trainer_spec.pad_id == 6
    assert len(merged.pieces) % 8 == 0 and merged.trainer_spec.vocab_size == len(merged.pieces)
    assert [p.type for p in merged.pieces[10:]] == [CONTROL] * 6
    assert texts(merged, 10) == [f"<reserved_{k}>" for k in range(6)]


def test_zero_scores_option_and_keep_non_chinese():
    base = make_proto(["a", "b"])
    add = make_proto(["ab", "中", "国", "中国"])
    add.pieces.append(Piece(piece="<sep>", type=USER_DEFINED))
    result = merge_model_protos(base, add, MergeOptions(new_piece_scores="zero", keep_non_chinese_pieces=True))
    assert texts(result.proto, 5) == ["ab", "中", "国", "中国", "<sep>"]
    assert result.proto.pieces[-1].type == USER_DEFINED
    assert {p.score for p in result.proto.pieces[5:]} == {0.0}
    with pytest.raises(ValueError):
        MergeOptions(new_piece_scores="high")


def test_descending_scores_stay_distinct_as_float32_near_minus_1e9():
    scores = _descending_float32_scores(-1e9, 20000)
    proto = make_proto([f"p{i}" for i in range(len(scores))])
    for piece, score in zip(proto.pieces[3:], scores):
        piece.score = score
    parsed = ModelProto()
    parsed.ParseFromString(proto.SerializeToString())  # scores are float32 on disk
    stored = [p.score for p in parsed.pieces[3:]]
    assert stored[0] < -1e9 and all(a > b for a, b in zip(stored, stored[1:]))
    assert _descending_float32_scores(-31740.0, 3) == [-31741.0, -31742.0, -31743.0]


def test_read_word_list_writes_spaces_as_sentencepiece_does(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("人工智能\n\n New York\r\n", encoding="utf-8")
    assert read_word_list(path) == ["人工智能", "▁New▁York"]


def test_chinese_character_classes():
    assert all(is_chinese_char(c) for c in "中國，。「」！（）𠀀")
    assert not any(is_chinese_char(c) for c in "aZ9 ,.!é–“”😀ä")
    assert has_chinese("GDP增长") and not has_chinese("GDP growth")


def test_hf_export_refuses_normalizers_it_cannot_reproduce():
    proto = make_proto(["a"])
    proto.normalizer_spec.remove_extra_whitespaces = True
    with pytest.raises(UnsupportedNormalizerError):
        build_hf_tokenizer(proto)


# --- atomic output -------------------------------------------------------------------


def test_atomic_output_dir_publishes_nothing_on_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target) as tmp:
            (tmp / "tokenizer.model").write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_keeps_other_files_of_an_existing_dir(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "tokenizer.json").write_text("old")
    with atomic_output_dir(target) as tmp:
        (tmp / "tokenizer.json").write_text("new")
    assert (target / "config.json").read_text() == "{}"
    assert (target / "tokenizer.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- embedding rows ------------------------------------------------------------------


@pytest.mark.skipif(not LLAMA2.is_file(), reason=f"LLaMA-2 tokenizer not found under {DATA} (set LLAMA_JAX_DATA)")
def test_init_new_rows_exact_values():
    base = load_model_proto(LLAMA2)
    add = make_proto(["中国", "▁中国", "天气"])  # 气 is not a LLaMA-2 piece: repair adds it
    merged = merge_model_protos(base, add, MergeOptions(pad_token=True, pad_to_multiple_of=64)).proto
    assert texts(merged, 32000)[:5] == ["<pad>", "中国", "▁中国", "天气", "气"]
    assert len(merged.pieces) == 32064

    old = np.arange(32000 * 3, dtype=np.float32).reshape(32000, 3)  # row i = [3i, 3i+1, 3i+2]
    new = init_new_rows(old, base, merged, 32064 + 64)
    assert new.shape == (32128, 3) and new.dtype == np.float32
    assert new[:32000].tobytes() == old.tobytes()
    mean_all = [47998.5, 47999.5, 48000.5]
    # LLaMA-2 spells (without the dummy prefix): 中国 = 中(30275) 国(30356);
    # ▁中国 = ▁(29871) 中 国; 天气 = 天(30408) <0xE6>(233) <0xB0>(179) <0x94>(151); 气 = the 3 bytes.
    expected = {
        32000: mean_all,  # <pad>
        32001: [90946.5, 90947.5, 90948.5],  # mean of rows 30275, 30356
        32002: [90502.0, 90503.0, 90504.0],  # mean of rows 29871, 30275, 30356
        32003: [23228.25, 23229.25, 23230.25],  # mean of rows 30408, 233, 179, 151
        32004: [563.0, 564.0, 565.0],  # mean of rows 233, 179, 151
        32005: mean_all,  # a <reserved_k> filler
        32100: mean_all,  # beyond the tokenizer
    }
    for row, values in expected.items():
        np.testing.assert_array_equal(new[row], np.array(values, dtype=np.float32), err_msg=f"row {row}")
    assert (new[32005:] == np.array(mean_all, dtype=np.float32)).all()


@pytest.mark.skipif(not LLAMA2.is_file(), reason=f"LLaMA-2 tokenizer not found under {DATA} (set LLAMA_JAX_DATA)")
def test_init_new_rows_keeps_dtype_and_checks_the_base():
    import ml_dtypes

    base = load_model_proto(LLAMA2)
    merged = merge_model_protos(base, make_proto(["中国"])).proto
    old = np.ones((32000, 2), dtype=ml_dtypes.bfloat16)
    new = init_new_rows(old, base, merged, 32001)
    assert new.dtype == old.dtype and float(new[32000, 0]) == 1.0
    with pytest.raises(ValueError, match="smaller"):
        init_new_rows(old, base, merged, 100)
    other = make_proto(["x"] * 1)
    with pytest.raises(ValueError, match="does not extend"):
        init_new_rows(np.zeros((5, 2), np.float32), other, merged, 6)

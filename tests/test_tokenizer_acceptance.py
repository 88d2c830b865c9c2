"""Acceptance checks for the Chinese tokenizer extension on the real data (issue 3).

One 20,000-piece model is trained per module on the first 90% of the lines of the two
Simplified Chinese corpus files, merged into LLaMA-2, and checked on the held-out 10%.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import sentencepiece as spm

from llama_jax.tokenizer import (
    MergeOptions,
    default_data_dir,
    find_dead_pieces,
    find_unreachable_pieces,
    load_model_proto,
    merge_model_protos,
    merge_tokenizers,
    tokenizer_report,
    train_bpe,
)
from llama_jax.tokenizer.corpus import read_lines, split_head_tail
from llama_jax.tokenizer.sp_model import CONTROL, USER_DEFINED, processor_from_proto

DATA = default_data_dir()
pytestmark = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"real data directory {DATA} not found (set LLAMA_JAX_DATA)"
)

BASE = DATA / "llama2-tokenizer" / "tokenizer.model"
CHINESE_LLAMA2 = DATA / "reference-tokenizers" / "chinese-llama2-tokenizer.model"
ZH_FILES = [DATA / "zh-corpus" / "clue_corpus_small_sample.txt", DATA / "zh-corpus" / "cmrc2018_wiki_paragraphs.txt"]
TRADITIONAL = DATA / "zh-corpus" / "drcd_wiki_paragraphs_zh_hant.txt"
WIKI_EN = DATA / "en-corpus" / "wiki_demo.txt"
NEWS_TSV = DATA / "en-corpus" / "news_commentary_v13_en_zh_sample.tsv"
VOCAB_SIZE = 20000


def chars_per_token(sp: spm.SentencePieceProcessor, lines: list[str]) -> float:
    return sum(len(line) for line in lines) / sum(len(ids) for ids in sp.encode(lines))


def english_lines() -> list[str]:
    return read_lines(WIKI_EN) + [line.split("\t")[0] for line in read_lines(NEWS_TSV)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    train, held_out = [], []
    for path in ZH_FILES:
        head, tail = split_head_tail(read_lines(path), 0.9)
        train += head
        held_out += tail
    root = tmp_path_factory.mktemp("zh_corpus")
    (root / "train.txt").write_text("\n".join(train) + "\n", encoding="utf-8")
    (root / "held_out.txt").write_text("\n".join(held_out) + "\n", encoding="utf-8")
    return types.SimpleNamespace(train_file=root / "train.txt", held_out_file=root / "held_out.txt", held_out=held_out)


@pytest.fixture(scope="module")
def merged(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("merged_tokenizer")
    trained = train_bpe(root / "zh20k", input_files=[corpus.train_file], vocab_size=VOCAB_SIZE)
    out_dir = root / "merged"
    result = merge_tokenizers(BASE, trained.model_path, out_dir, MergeOptions(pad_token=True, pad_to_multiple_of=64))
    return types.SimpleNamespace(
        trained=trained,
        result=result,
        dir=out_dir,
        proto=load_model_proto(out_dir),
        sp=spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model")),
        base_sp=spm.SentencePieceProcessor(model_file=str(BASE)),
    )


@pytest.fixture(scope="module")
def hf_tokenizer(merged):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(merged.dir))


def test_training_is_fast_and_complete(merged):
    assert merged.trained.seconds < 30, f"training took {merged.trained.seconds:.1f}s"
    assert spm.SentencePieceProcessor(model_file=str(merged.trained.model_path)).vocab_size() == VOCAB_SIZE
    assert merged.trained.stats.lines == 2250 + 993
    assert merged.trained.stats.too_long_lines == 0


def test_base_pieces_ids_scores_types_unchanged(merged):
    base = load_model_proto(BASE)
    assert len(merged.proto.pieces) > len(base.pieces) == 32000
    for i, (old, new) in enumerate(zip(base.pieces, merged.proto.pieces)):
        assert (old.piece, old.score, old.type) == (new.piece, new.score, new.type), i
    assert merged.proto.normalizer_spec == base.normalizer_spec
    assert merged.proto.trainer_spec.byte_fallback


def test_new_pieces_rank_below_every_base_piece(merged):
    base_min = min(p.score for p in merged.proto.pieces[:32000])
    new_scores = [p.score for p in merged.proto.pieces[32000:] if p.type == 1]
    assert max(new_scores) < base_min
    assert all(a > b for a, b in zip(new_scores, new_scores[1:])), "scores must be distinct and in source order"


def test_pad_token_and_padding_to_multiple_of_64(merged, hf_tokenizer):
    proto = merged.proto
    assert len(proto.pieces) % 64 == 0
    assert proto.pieces[32000].piece == "<pad>" and proto.pieces[32000].type == USER_DEFINED
    fillers = [p for p in proto.pieces[32000:] if p.type == CONTROL]
    assert len(fillers) == merged.result.filler_count > 0
    assert hf_tokenizer.pad_token_id == 32000
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.unk_token_id) == (1, 2, 0)
    assert len(hf_tokenizer) == len(proto.pieces)


def test_held_out_chars_per_token(merged, corpus):
    base = chars_per_token(merged.base_sp, corpus.held_out)
    new = chars_per_token(merged.sp, corpus.held_out)
    print(f"held-out chars/token: LLaMA-2 {base:.3f}, merged {new:.3f}")
    assert 0.65 < base < 0.75
    assert new >= 1.40


def test_english_tokenizes_exactly_as_llama2(merged):
    lines = english_lines()
    assert len(lines) == 1030
    changed = [line[:60] for line, a, b in zip(lines, merged.sp.encode(lines), merged.base_sp.encode(lines)) if a != b]
    assert changed == []


def test_no_dead_pieces_after_repair(merged):
    assert find_dead_pieces(merged.proto) == []
    assert find_unreachable_pieces(merged.proto) == []


def test_hf_tokenizer_agrees_with_sentencepiece_on_every_line(merged, hf_tokenizer, corpus):
    files = {
        "held-out": corpus.held_out,
        "wiki_demo": read_lines(WIKI_EN),
        "news (English column)": [line.split("\t")[0] for line in read_lines(NEWS_TSV)],
        "news (whole lines)": read_lines(NEWS_TSV),
        "traditional": read_lines(TRADITIONAL),
    }
    for name, lines in files.items():
        expected = [[1] + ids for ids in merged.sp.encode(lines)]
        got = hf_tokenizer(lines)["input_ids"]
        bad = [line[:50] for line, a, b in zip(lines, expected, got) if a != b]
        assert bad == [], f"{name}: {len(bad)} lines differ"


PLAIN_TEXT_EDGE_CASES = [
    "",
    " ",
    "   ",
    " leading space",
    "trailing space ",
    "two  spaces and\ttab",
    "中文 English 混合 text，标点！",
    " 前面有空格",
    "\u3000全角空格",
    "emoji 😀 and rare 𠀀 and accents éü",
    "12345 67.89",
    "▁literal▁marker",
] + [" " * n + "x" + " " * n + "中国" for n in range(1, 41)]  # LLaMA-2's whitespace pieces tie at -1e9


def test_hf_tokenizer_agrees_on_plain_text_edge_cases(merged, hf_tokenizer):
    for text in PLAIN_TEXT_EDGE_CASES:
        assert hf_tokenizer(text)["input_ids"] == [1] + merged.sp.encode(text), repr(text)
        assert hf_tokenizer.decode(hf_tokenizer(text)["input_ids"], skip_special_tokens=True) == merged.sp.decode(
            merged.sp.encode(text)
        ), repr(text)


def test_report_on_merged_tokenizer(merged, corpus):
    report = tokenizer_report(merged.dir, BASE, [corpus.held_out_file, WIKI_EN], check_hf=True)
    held, wiki = report.files
    assert held.chars_per_token >= 1.40 and held.base_chars_per_token < 0.75
    assert wiki.non_chinese_lines == 29 and wiki.non_chinese_changed == 0
    assert report.non_chinese_changed_share == 0.0
    assert held.roundtrip_ok == held.lines and wiki.roundtrip_ok == wiki.lines
    assert held.hf_agree == held.lines and wiki.hf_agree == wiki.lines
    assert report.dead_pieces == [] and report.vocab_size == len(merged.proto.pieces)


def test_report_finds_dead_pieces_of_chinese_llama2(corpus):
    report = tokenizer_report(CHINESE_LLAMA2, BASE, [corpus.held_out_file])
    # 630 by the one-step rule (629 + '<pad>', a NORMAL piece there), 655 counting pieces
    # whose every split uses a dead piece; see docs/tokenizer.md for the 653 comparison.
    assert len(report.dead_pieces) == 630
    assert (33103, "越来越") in report.dead_pieces and (32000, "<pad>") in report.dead_pieces
    assert len(report.unreachable_pieces) == 655
    assert all(i >= 32000 for i, _ in report.unreachable_pieces)
    # Cross-check of the chars/token definition with the number quoted for this tokenizer.
    assert report.files[0].chars_per_token == pytest.approx(1.400, abs=5e-4)


def test_traditional_chinese_chars_per_token(merged):
    lines = read_lines(TRADITIONAL)
    base, new = chars_per_token(merged.base_sp, lines), chars_per_token(merged.sp, lines)
    print(f"traditional chars/token: LLaMA-2 {base:.3f}, merged (simplified-trained) {new:.3f}")
    assert new > base


def test_training_on_both_scripts_helps_traditional(tmp_path, corpus):
    trad_train, trad_held_out = split_head_tail(read_lines(TRADITIONAL), 0.9)
    trad_file = tmp_path / "trad_train.txt"
    trad_file.write_text("\n".join(trad_train) + "\n", encoding="utf-8")
    trained = train_bpe(tmp_path / "both", input_files=[corpus.train_file, trad_file], vocab_size=VOCAB_SIZE)
    merged_proto = merge_model_protos(load_model_proto(BASE), load_model_proto(trained.model_path)).proto
    both = chars_per_token(processor_from_proto(merged_proto), trad_held_out)
    reference = chars_per_token(spm.SentencePieceProcessor(model_file=str(CHINESE_LLAMA2)), trad_held_out)
    print(f"traditional held-out chars/token: trained on both scripts {both:.3f}, Chinese-LLaMA-2 {reference:.3f}")
    assert both > reference


def test_scoring_and_filter_choice_is_needed(merged):
    """Without the Chinese-only filter new Latin pieces (GDP, Mike, ...) change English;
    scoring new pieces at 0 (above all LLaMA merges) changes more lines than below-base."""
    base, add = load_model_proto(BASE), load_model_proto(merged.trained.model_path)
    lines = english_lines()
    expected = merged.base_sp.encode(lines)
    changed = {}
    for mode in ("below-base", "zero"):
        proto = merge_model_protos(base, add, MergeOptions(new_piece_scores=mode, keep_non_chinese_pieces=True)).proto
        changed[mode] = sum(a != b for a, b in zip(processor_from_proto(proto).encode(lines), expected))
    print(f"English lines changed without the filter: {changed}")
    assert 0 < changed["below-base"] < changed["zero"]


def test_embedding_rows_for_merged_tokenizer(merged):
    from llama_jax.tokenizer import init_new_rows

    rng = np.random.default_rng(0)
    old = rng.standard_normal((32000, 8)).astype(np.float32)
    new = init_new_rows(old, BASE, merged.dir, len(merged.proto.pieces))
    assert new.shape == (len(merged.proto.pieces), 8) and new.dtype == np.float32
    assert new[:32000].tobytes() == old.tobytes()
    piece_id = merged.sp.piece_to_id("一个")
    assert piece_id >= 32000
    expected = old[[merged.base_sp.piece_to_id("一"), merged.base_sp.piece_to_id("个")]].astype(np.float64).mean(0)
    np.testing.assert_array_equal(new[piece_id], expected.astype(np.float32))

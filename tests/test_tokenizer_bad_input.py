"""Bad input: empty corpora, invalid UTF-8, bases that are not sentencepiece BPE models."""

from __future__ import annotations

import argparse
import random

import pytest

from llama_jax.tokenizer import (
    EmptyCorpusError,
    NotSentencePieceBPEError,
    TokenizerFormatError,
    default_data_dir,
    merge_tokenizers,
    train_bpe,
)
from llama_jax.tokenizer.cli import add_tokenizer_commands
from llama_jax.tokenizer.train import SentencePieceTrainingError

DATA = default_data_dir()
LLAMA2 = DATA / "llama2-tokenizer" / "tokenizer.model"
UNIGRAM = DATA / "reference-tokenizers" / "chinese_sp.model"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data directory {DATA} not found (set LLAMA_JAX_DATA)")

WORDS = "中国 人工 智能 学习 模型 数据 训练 语言 我们 可以 一个 世界".split()


def synthetic_lines(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "。" for _ in range(count)]


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llama-jax")
    add_tokenizer_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    corpus = root / "zh.txt"
    corpus.write_text("\n".join(synthetic_lines(300)) + "\n", encoding="utf-8")
    return train_bpe(root / "small", input_files=[corpus], vocab_size=100).model_path


# --- training ------------------------------------------------------------------------


def test_empty_corpus_is_a_clear_error_naming_the_files(tmp_path):
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.txt"
    empty.write_bytes(b"")
    blank.write_bytes(b"\n\r\n\n")
    with pytest.raises(EmptyCorpusError, match="empty corpus") as info:
        train_bpe(tmp_path / "out" / "zh", input_files=[empty, blank], vocab_size=100)
    assert str(empty) in str(info.value) and str(blank) in str(info.value)
    assert not (tmp_path / "out").exists()  # checked before anything is created


def test_empty_corpus_cli_exit_code_2(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    argv = ["tokenizer", "train", "--input", str(empty), "--vocab-size", "100", "--out", str(tmp_path / "zh")]
    assert run_cli(argv) == 2
    assert str(empty) in capsys.readouterr().err
    assert not (tmp_path / "zh.model").exists()


def test_invalid_utf8_lines_are_skipped_and_counted(tmp_path):
    good = synthetic_lines(300)
    bad = [b"\xff\xfe not utf-8", b"\xc3\x28", "中国".encode("utf-8")[:-1]]  # the last one is truncated
    encoded = [line.encode("utf-8") for line in good]
    data = b"\n".join(encoded[:100] + bad + encoded[100:])
    corpus = tmp_path / "mixed.txt"
    corpus.write_bytes(data + b"\n")
    result = train_bpe(tmp_path / "zh", input_files=[corpus], vocab_size=100)
    assert result.stats.invalid_utf8_lines == 3
    assert result.stats.lines == 300
    assert result.model_path.is_file() and result.vocab_path.is_file()


def test_only_invalid_lines_is_an_empty_corpus(tmp_path):
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(b"\xff\n\xfe\xfe\n")
    with pytest.raises(EmptyCorpusError, match="2 invalid UTF-8 lines"):
        train_bpe(tmp_path / "zh", input_files=[corpus], vocab_size=100)


def test_missing_input_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_bpe(tmp_path / "zh", input_files=[tmp_path / "nope.txt"], vocab_size=100)


# --- merging into a base that is not a sentencepiece BPE model -------------------------


def assert_nothing_written(parent, before):
    assert sorted(p.name for p in parent.iterdir()) == before


@needs_data
def test_unigram_base_is_rejected(tmp_path, small_model):
    out = tmp_path / "merged"
    with pytest.raises(NotSentencePieceBPEError, match="UNIGRAM") as info:
        merge_tokenizers(UNIGRAM, small_model, out)
    assert str(UNIGRAM) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert_nothing_written(tmp_path, [])


def test_tiktoken_text_file_base_is_rejected(tmp_path, small_model):
    base = tmp_path / "cl100k_base.tiktoken"
    base.write_text("IQ== 0\nIg== 1\nIw== 2\nJA== 3\nJQ== 4\n")
    with pytest.raises(TokenizerFormatError, match="cl100k_base.tiktoken"):
        merge_tokenizers(base, small_model, tmp_path / "merged")
    assert_nothing_written(tmp_path, ["cl100k_base.tiktoken"])


def test_random_bytes_and_missing_model_are_rejected(tmp_path, small_model):
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(bytes(random.Random(1).randrange(256) for _ in range(4096)))
    with pytest.raises(TokenizerFormatError, match="tokenizer.model"):
        merge_tokenizers(junk, small_model, tmp_path / "merged")
    hf_dir = tmp_path / "hf_model_without_sp"
    hf_dir.mkdir()
    with pytest.raises(TokenizerFormatError, match="no tokenizer.model"):
        merge_tokenizers(hf_dir, small_model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@needs_data
def test_add_model_must_be_sentencepiece(tmp_path):
    add = tmp_path / "zh.model"
    add.write_text("not a model\n")
    with pytest.raises(TokenizerFormatError, match="zh.model"):
        merge_tokenizers(LLAMA2, add, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@needs_data
def test_cli_bad_base_exit_code_2_with_file_name(tmp_path, small_model, capsys):
    out = tmp_path / "merged"
    code = run_cli(["tokenizer", "merge", "--base", str(UNIGRAM), "--add", str(small_model), "--out", str(out)])
    assert code == 2
    assert str(UNIGRAM) in capsys.readouterr().err
    assert not out.exists()


def test_trainer_failure_is_a_value_error_and_leaves_no_files(tmp_path):
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join(synthetic_lines(50)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="zh.txt") as info:
        train_bpe(out / "zh", input_files=[corpus], vocab_size=5)  # fewer pieces than characters
    assert "vocab" in str(info.value).lower()
    assert list(out.iterdir()) == []


def test_vocab_size_below_required_chars_is_raised_to_fit(tmp_path):
    # The shared Chinese corpus needs ~4.3k pieces to cover its characters; sentencepiece refuses a
    # smaller vocab_size ("Vocabulary size is smaller than required_chars").  Here: 600 distinct
    # characters, each frequent enough that coverage 0.9995 needs nearly all of them.
    chars = [chr(0x4E00 + i) for i in range(600)]
    lines = ["".join(chars[(i * 7 + j) % 600] for j in range(40)) for i in range(900)]
    corpus = tmp_path / "zh.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(SentencePieceTrainingError, match="required_chars"):
        train_bpe(tmp_path / "strict", input_files=[corpus], vocab_size=300)
    assert not (tmp_path / "strict.model").exists()
    result = train_bpe(tmp_path / "auto", input_files=[corpus], vocab_size=300, raise_vocab_to_cover=True)
    assert result.notice and "raised from 300" in result.notice
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(result.model_path))
    assert sp.get_piece_size() == result.vocab_size > 600
    assert all(sp.piece_to_id(c) != sp.unk_id() for c in chars)  # every character is a piece
    # a vocab that already fits is left alone
    assert train_bpe(tmp_path / "big", input_files=[corpus], vocab_size=800, raise_vocab_to_cover=True).vocab_size == 800

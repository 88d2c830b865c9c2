"""`tokenizer train|merge|report` through argparse, as the main CLI will call them."""

from __future__ import annotations

import argparse
import json

import pytest
import sentencepiece as spm

from llama_jax.tokenizer import default_data_dir
from llama_jax.tokenizer.cli import add_tokenizer_commands

DATA = default_data_dir()
pytestmark = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"real data directory {DATA} not found (set LLAMA_JAX_DATA)"
)
LLAMA2 = DATA / "llama2-tokenizer" / "tokenizer.model"
CMRC = DATA / "zh-corpus" / "cmrc2018_wiki_paragraphs.txt"
NEWS_TSV = DATA / "en-corpus" / "news_commentary_v13_en_zh_sample.tsv"


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="llama-jax")
    add_tokenizer_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_train_merge_report_round_trip(tmp_path, capsys):
    prefix = tmp_path / "zh" / "zh6k"
    assert run_cli(["tokenizer", "train", "--input", str(CMRC), "--vocab-size", "6000", "--out", str(prefix)]) == 0
    assert spm.SentencePieceProcessor(model_file=f"{prefix}.model").vocab_size() == 6000
    assert (tmp_path / "zh" / "zh6k.vocab").read_text(encoding="utf-8").startswith("<unk>\t")

    words = tmp_path / "words.txt"
    words.write_text("人工智能\n深度学习\n", encoding="utf-8")
    out = tmp_path / "merged"
    argv = ["tokenizer", "merge", "--base", str(LLAMA2), "--add", f"{prefix}.model", "--add-words", str(words),
            "--pad-token", "--pad-to-multiple-of", "64", "--out", str(out)]
    assert run_cli(argv) == 0
    assert {p.name for p in out.iterdir()} == {
        "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"
    }
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.vocab_size() % 64 == 0
    assert sp.encode("人工智能", out_type=str) == ["▁", "人工智能"]
    capsys.readouterr()

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("人工智能是计算机科学的一个分支。\n深度学习\n", encoding="utf-8")
    english = tmp_path / "english.txt"
    news = NEWS_TSV.read_text(encoding="utf-8").splitlines()[:30]
    english.write_text("".join(line.split("\t")[0] + "\n" for line in news), encoding="utf-8")
    argv = ["tokenizer", "report", "--tokenizer", str(out), "--base", str(LLAMA2),
            "--text", str(held_out), str(english), "--json", "--check-hf"]
    assert run_cli(argv) == 0
    report = json.loads(capsys.readouterr().out)
    held, en = report["files"]
    assert held["chars_per_token"] > held["base_chars_per_token"]
    assert held["hf_agree"] == held["lines"] == 2 and en["hf_agree"] == en["lines"] == 30
    assert en["non_chinese_lines"] == 30 and en["non_chinese_changed"] == 0
    assert report["non_chinese_changed_share"] == 0.0 and report["dead_piece_count"] == 0
    assert report["vocab_size"] == sp.vocab_size()

    argv = ["tokenizer", "report", "--tokenizer", str(out), "--base", str(LLAMA2), "--text", str(held_out)]
    assert run_cli(argv) == 0
    text = capsys.readouterr().out
    assert "| held_out.txt | 2 |" in text and "Dead pieces (no split into two pieces): 0" in text


def test_train_from_a_streamed_dataset_file(tmp_path, capsys):
    rows = [{"text": line} for line in CMRC.read_text(encoding="utf-8").splitlines()[:300]]
    rows.insert(5, {"text": None})
    rows.insert(9, {"title": "no text field"})
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    prefix = tmp_path / "ds"
    argv = ["tokenizer", "train", "--dataset", str(data), "--text-field", "text",
            "--vocab-size", "4000", "--out", str(prefix)]
    assert run_cli(argv) == 0
    out = capsys.readouterr().out
    assert "trained on 300 lines" in out and "skipped 2 rows without a string field 'text'" in out
    assert spm.SentencePieceProcessor(model_file=f"{prefix}.model").vocab_size() == 4000


def test_report_missing_text_file_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    argv = ["tokenizer", "report", "--tokenizer", str(LLAMA2), "--base", str(LLAMA2), "--text", str(missing)]
    assert run_cli(argv) == 2
    assert "nope.txt" in capsys.readouterr().err


def test_tokenizer_command_requires_a_subcommand():
    with pytest.raises(SystemExit) as info:
        run_cli(["tokenizer"])
    assert info.value.code == 2


def test_merge_into_an_existing_hf_model_dir(tmp_path):
    """BASE may be an HF model dir; its tokenizer settings are kept and, when OUT is that
    kind of dir, its other files (config, weights) are left alone."""
    import shutil

    from transformers import AutoTokenizer

    from llama_jax.tokenizer import merge_tokenizers

    model_dir = tmp_path / "llama2-hf"
    model_dir.mkdir()
    shutil.copy(LLAMA2, model_dir / "tokenizer.model")
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096, "padding_side": "right"}))
    out = tmp_path / "chinese-llama2-hf"
    out.mkdir()
    (out / "config.json").write_text("{}")
    unigram_add = DATA / "reference-tokenizers" / "chinese_sp.model"  # any sentencepiece model may be added
    result = merge_tokenizers(model_dir, unigram_add, out)
    assert result.added_from_model > 10000
    assert (out / "config.json").read_text() == "{}"
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.model_max_length == 4096 and tok.padding_side == "right"
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    text = "人工智能是计算机科学的一个分支，它企图了解智能的实质。"
    assert tok(text)["input_ids"] == [1] + sp.encode(text)
    assert len(sp.encode(text)) < 34  # LLaMA-2 alone needs 34 pieces (data README)

"""The CLI end to end: `llama-jax generate` streams exactly the text generate() returns."""
import numpy as np

import llama_jax
from llama_jax.cli import main
from llama_jax.text import load_tokenizer


def test_generate_cli_streams_same_text(tmp_path, data_dir, capsys):
    tok_path = data_dir / "llama2-tokenizer" / "tokenizer.model"
    tok = load_tokenizer(tok_path)
    model = llama_jax.init_model(llama_jax.preset("toy", vocab_size=len(tok)), seed=3)
    d = llama_jax.save_hf(model, tmp_path / "m", tokenizer=None)
    expect = llama_jax.generate(model, "人工智能是", tok, max_new_tokens=10, temperature=0)[0]
    assert main(["generate", "--model", str(d), "--tokenizer", str(tok_path), "--prompt", "人工智能是",
                 "--max-new-tokens", "10", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == expect + "\n"


def test_generate_cli_bad_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_text_prompt_encoding_has_bos(data_dir):
    tok = load_tokenizer(data_dir / "llama2-tokenizer" / "tokenizer.model")
    ids = tok("人工智能是计算机科学的一个分支，它企图了解智能的实质。")["input_ids"]
    assert ids[0] == 1 and len(ids) == 35  # shared/data README: 34 pieces, plus BOS

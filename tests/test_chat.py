"""Chat keeps the KV cache across turns and answers exactly as re-encoding the whole history would."""
import numpy as np

import llama_jax
from llama_jax.chat_cli import ChatSession
from llama_jax.text import load_tokenizer


def test_cached_turns_equal_full_reencode(data_dir):
    tok = load_tokenizer(data_dir / "llama2-tokenizer" / "tokenizer.model")
    model = llama_jax.init_model(llama_jax.preset("toy", initializer_range=0.2), seed=5)
    s = ChatSession(model, tok, "llama2-chat", system="你是助手。", max_new_tokens=12, temperature=0.0,
                    max_length=256, stream=False)
    s.ask("你好")
    first_index = int(s.cache.index)
    second = s.ask("请介绍一下北京。")
    assert int(s.cache.index) > first_index  # appended, not rebuilt
    # the same conversation encoded from scratch, generated in one go
    (u1, r1), (u2, r2) = s.history
    ids = s._turn_ids(u1, []) + r1 + s._turn_ids(u2, [(u1, r1)])
    full = llama_jax.generate(model, [ids], max_new_tokens=12, temperature=0.0, eos_ids=[tok.eos_token_id])[0]
    assert r2 == full
    assert second == tok.decode(full)


def test_max_new_tokens_beyond_the_context_is_capped_not_refused(data_dir, capsys):
    """The default --max-new-tokens 512 on a model with a 64-token context: a short message gets a
    reply capped at the context left (said once); only a message that itself does not fit is refused."""
    import pytest

    tok = load_tokenizer(data_dir / "llama2-tokenizer" / "tokenizer.model")
    model = llama_jax.init_model(llama_jax.preset("toy", initializer_range=0.2, max_position_embeddings=64), seed=5)
    s = ChatSession(model, tok, "llama2-chat", max_new_tokens=512, temperature=0.0, stream=False)
    s.ask("你好")
    (u1, r1), = s.history
    ids = s._turn_ids(u1, [])
    T = -(-len(ids) // 16) * 16
    cap = (64 - T) - (64 - T) % 16
    assert 1 <= len(r1) <= cap
    assert r1 == llama_jax.generate(model, [ids], max_new_tokens=cap, temperature=0.0, eos_ids=[tok.eos_token_id])[0]
    s.ask("再见")  # the history no longer fits with a reply: re-encoded from what fits, reply capped again
    err = capsys.readouterr().err
    assert err.count("capped at the context left") == 1
    with pytest.raises(ValueError, match="max_length=64"):
        s.ask("北京" * 80)
    assert len(s.history) >= 1 and s.ask("好") is not None  # the session goes on

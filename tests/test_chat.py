"""Chat keeps the KV cache across turns and answers exactly as re-encoding the whole history would."""
import numpy as np

import llama_jax
from llama_jax.chat import ChatSession
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

"""`llama-jax serve` on real weights (SmolLM2-135M-Instruct): greedy chat and completion answers
equal llama_jax.generate's for the same prompt ids, requests one at a time and 16 at once."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

import llama_jax
from llama_jax.data.records import Conversation
from llama_jax.data.templates import generation_prompt_ids
from llama_jax.text import load_tokenizer
from serve_util import Server

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 2 + 2?",
             "Write a haiku about the sea.", "Who wrote Hamlet?", "What is photosynthesis?", "Say hello in French.",
             "What is the largest planet?", "Give me a synonym for happy.", "How many legs does a spider have?",
             "What is the boiling point of water?", "Translate 'cat' to Spanish.", "What color is the sky?",
             "Name a famous scientist.", "What is Python?", "Why do we sleep?"]
N = 16


def test_smollm2_greedy_equals_generate_alone_and_16_at_once(smollm2_dir, tmp_path):
    tok = load_tokenizer(smollm2_dir)
    model = llama_jax.load(smollm2_dir)
    chat = [generation_prompt_ids(Conversation(None, [("user", q)]), tok, "tokenizer") for q in QUESTIONS]
    plain = [tok(q)["input_ids"] for q in QUESTIONS]
    ref = llama_jax.generate(model, chat + plain, max_new_tokens=N, temperature=0.0)
    want = [(tok.decode(r, skip_special_tokens=True), len(r)) for r in ref]
    assert "Paris" in want[0][0]
    del model
    srv = Server(["--model", str(smollm2_dir), "--max-batch", "16", "--max-length", "256",
                  "--prefill-buckets", "64"], tmp_path / "serve.log")
    try:
        assert "chat template 'tokenizer'" in srv.output(full=True)  # SmolLM2's own, chosen by default

        def ask(i):
            if i < len(QUESTIONS):
                r = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTIONS[i]}],
                                                      "max_tokens": N, "temperature": 0}, timeout=600).json()
                return r["choices"][0]["message"]["content"], r["usage"]["completion_tokens"]
            r = srv.post("/v1/completions", {"prompt": QUESTIONS[i - len(QUESTIONS)], "max_tokens": N,
                                             "temperature": 0}, timeout=600).json()
            return r["choices"][0]["text"], r["usage"]["completion_tokens"]

        alone = [ask(i) for i in range(0, 2 * len(QUESTIONS), 4)]
        assert alone == want[::4]
        with ThreadPoolExecutor(16) as ex:
            chat_16 = list(ex.map(ask, range(len(QUESTIONS))))
        assert chat_16 == want[:len(QUESTIONS)]
        with ThreadPoolExecutor(16) as ex:
            plain_16 = list(ex.map(ask, range(len(QUESTIONS), 2 * len(QUESTIONS))))
        assert plain_16 == want[len(QUESTIONS):]
    finally:
        srv.stop()

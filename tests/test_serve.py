"""`llama-jax serve` on a toy model (one server per module, started by the test on a free
loopback port): the real `openai` client, greedy parity with llama_jax.generate one at a time and
16 at once, per-slot seeded sampling independent of the batch, a 64-request load from 16 clients,
every bad input's status code (the server still answering afterwards), the bounded queue (429),
a client disconnect freeing its slot, the max_tokens cap at the context left."""
from __future__ import annotations

import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

import llama_jax
from llama_jax.data.records import Conversation
from llama_jax.data.templates import generation_prompt_ids
from llama_jax.text import load_tokenizer
from serve_util import Server

KEY = "sk-test-key"
MAX_LENGTH = 256
QUESTIONS = ["你好", "请介绍一下北京。", "What is the capital of France?", "写一首关于春天的诗",
             "1 + 1 = ?", "Tell me a story about a cat.", "为什么天空是蓝色的？", "List three fruits.",
             "上海在哪里？", "How do planes fly?", "翻译：good morning", "What is JAX?", "你是谁？",
             "Name a prime number.", "解释一下机器学习", "Say hello."]


REF_TOKENS = 24  # every reference is one batched generate call of 24 tokens, cut to what a test asks


@pytest.fixture(scope="module")
def toy(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("serve") / "toy"
    sp = data_dir / "llama2-tokenizer" / "tokenizer.model"
    model = llama_jax.init_model(llama_jax.preset("toy", initializer_range=0.2), seed=5)
    llama_jax.save_hf(model, d)
    return d, llama_jax.load(d), load_tokenizer(sp), sp


@pytest.fixture(scope="module")
def server(toy, tmp_path_factory):
    d, _, _, sp = toy
    # the sentencepiece tokenizer: transformers takes ~12 s (contended) to build the fast one here
    s = Server(["--model", str(d), "--tokenizer", str(sp), "--max-batch", "8", "--max-length", str(MAX_LENGTH),
                "--max-queue", "16", "--prefill-buckets", "64", "--template", "llama2-chat"],
               tmp_path_factory.mktemp("log") / "serve.log", api_key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def refs(toy):
    """Greedy continuations (llama_jax.generate, the `llama-jax generate --temperature 0` path) of
    every prompt the tests send, in one call: token-id tuple -> ids (EOS kept)."""
    _, model, tok, _ = toy
    prompts = [chat_ids(tok, QUESTIONS[1]), tok(COMPLETION)["input_ids"]]
    prompts += [tok(q)["input_ids"] for q in QUESTIONS] + [tok(q)["input_ids"] for q in load_questions()]
    out = llama_jax.generate(model, prompts, max_new_tokens=REF_TOKENS, temperature=0.0)
    return {tuple(p): o for p, o in zip(prompts, out)}


COMPLETION = "The capital of France is"


def load_questions():
    return [f"{QUESTIONS[i % 16]} ({i})" for i in range(64)]


def reference(refs, tok, prompt_ids, n):
    """(ids, text) of the greedy continuations of `prompt_ids`, n tokens (fewer after EOS)."""
    out = [refs[tuple(p)][:n] for p in prompt_ids]
    return out, [tok.decode(o, skip_special_tokens=True) for o in out]


def chat_ids(tok, q):
    return generation_prompt_ids(Conversation(None, [("user", q)]), tok, "llama2-chat")


def client(server):
    import openai

    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_openai_client_chat_and_completion_streamed_equals_plain(server, toy, refs):
    _, model, tok, _ = toy
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["toy"]
    q = QUESTIONS[1]
    ref_ids, ref_text = reference(refs, tok, [chat_ids(tok, q)], 20)
    r = c.chat.completions.create(model="toy", messages=[{"role": "user", "content": q}], max_tokens=20,
                                  temperature=0)
    assert r.choices[0].message.content == ref_text[0]
    assert r.usage.completion_tokens == len(ref_ids[0])
    assert r.usage.prompt_tokens == len(chat_ids(tok, q))
    assert r.choices[0].finish_reason == ("stop" if ref_ids[0][-1] == 2 else "length")
    chunks = list(c.chat.completions.create(model="toy", messages=[{"role": "user", "content": q}], max_tokens=20,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == r.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    p = COMPLETION
    ref_ids, ref_text = reference(refs, tok, [tok(p)["input_ids"]], 24)
    r = c.completions.create(model="toy", prompt=p, max_tokens=24, temperature=0)
    assert r.choices[0].text == ref_text[0] and r.usage.completion_tokens == len(ref_ids[0])
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="toy", prompt=p, max_tokens=24,
                                                                          temperature=0, stream=True))
    assert streamed == r.choices[0].text
    # raw SSE framing: OpenAI chunks, ending with [DONE]
    with httpx.stream("POST", server.base + "/v1/completions", headers=server.headers, timeout=60,
                      json={"prompt": p, "max_tokens": 5, "temperature": 0, "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in resp.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_greedy_equals_generate_one_at_a_time_and_16_at_once(server, toy, refs):
    _, model, tok, _ = toy
    prompts = [tok(q)["input_ids"] for q in QUESTIONS]
    ref_ids, ref_text = reference(refs, tok, prompts, 16)

    def ask(i):
        r = server.post("/v1/completions", {"prompt": QUESTIONS[i], "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()

    alone = [ask(i) for i in range(len(QUESTIONS))]
    with ThreadPoolExecutor(16) as ex:
        together = list(ex.map(ask, range(len(QUESTIONS))))
    for i in range(len(QUESTIONS)):
        for got in (alone[i], together[i]):
            assert got["choices"][0]["text"] == ref_text[i], i
            assert got["usage"]["completion_tokens"] == len(ref_ids[i]), i
    # token-id prompts (a list of ints) take the same path
    r = server.post("/v1/completions", {"prompt": prompts[3], "max_tokens": 16, "temperature": 0}).json()
    assert r["choices"][0]["text"] == ref_text[3]


def test_seeded_sampling_does_not_depend_on_the_batch(server):
    body = {"prompt": QUESTIONS[0], "max_tokens": 24, "temperature": 0.9, "top_k": 50, "top_p": 0.9, "seed": 1234}

    def ask(b):
        r = server.post("/v1/completions", b)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    alone = ask(body)
    with ThreadPoolExecutor(8) as ex:  # the same request among 7 others with other parameters
        others = [dict(body, seed=i, temperature=0.5 + i / 10, top_k=i, prompt=QUESTIONS[i]) for i in range(1, 8)]
        futs = [ex.submit(ask, b) for b in others[:4]] + [ex.submit(ask, body)] + [ex.submit(ask, b) for b in others[4:]]
        busy = futs[4].result()
        [f.result() for f in futs]
    assert busy == alone
    assert ask(dict(body, seed=99)) != alone  # the seed matters (24 sampled tokens)


def test_load_64_requests_from_16_clients(server, toy, refs):
    _, model, tok, _ = toy
    n_req, n_clients = 64, 16
    qs = load_questions()
    mts = [8 + i % 17 for i in range(n_req)]
    want = []
    for q, mt in zip(qs, mts):
        ids, text = reference(refs, tok, [tok(q)["input_ids"]], mt)
        want.append((text[0], len(ids[0])))
    lat, results = [None] * n_req, [None] * n_req

    def worker(w):
        with httpx.Client(timeout=120, headers=server.headers) as h:
            for i in range(w, n_req, n_clients):
                t0 = time.perf_counter()
                r = h.post(server.base + "/v1/completions", json={"prompt": qs[i], "max_tokens": mts[i],
                                                                  "temperature": 0})
                lat[i] = time.perf_counter() - t0
                results[i] = r

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_clients)]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    wall = time.perf_counter() - t0
    for i, r in enumerate(results):
        assert r is not None and r.status_code == 200, (i, r and r.text)
        j = r.json()
        assert (j["choices"][0]["text"], j["usage"]["completion_tokens"]) == want[i], i
    toks = sum(r.json()["usage"]["completion_tokens"] for r in results)
    lat.sort()
    print(f"\nserve load (toy model, 8 slots): {n_req} requests from {n_clients} clients, {toks} tokens in "
          f"{wall:.2f} s = {toks / wall:.0f} tok/s, {n_req / wall:.1f} req/s; latency p50 "
          f"{statistics.median(lat) * 1e3:.0f} ms, p99 {lat[int(0.99 * (n_req - 1))] * 1e3:.0f} ms "
          "(contended shared VM)")


BAD = [  # (body or raw bytes, path, status, field named in the error)
    (b"{not json", "/v1/completions", 400, None),
    (b"[1, 2]", "/v1/completions", 400, None),
    ({"prompt": "hi", "max_tokens": "ten"}, "/v1/completions", 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "/v1/completions", 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -5}, "/v1/completions", 400, "max_tokens"),
    ({"prompt": "hi", "temperature": "hot"}, "/v1/completions", 400, "temperature"),
    ({"prompt": "hi", "temperature": -1}, "/v1/completions", 400, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "/v1/completions", 400, "top_p"),
    ({"prompt": "hi", "stream": "yes"}, "/v1/completions", 400, "stream"),
    ({"prompt": "hi", "n": 2}, "/v1/completions", 400, "n"),
    ({"prompt": "hi", "stop": 5}, "/v1/completions", 400, "stop"),
    ({"prompt": "hi", "logprobs": 3}, "/v1/completions", 400, "logprobs"),
    ({"prompt": ["a", "b"]}, "/v1/completions", 400, "prompt"),
    ({"prompt": [5, 99999999]}, "/v1/completions", 400, "prompt"),
    ({"max_tokens": 5}, "/v1/completions", 400, "prompt"),
    ({"prompt": list(range(3, 3 + MAX_LENGTH))}, "/v1/completions", 400, "prompt"),
    ({"prompt": "你好" * 400}, "/v1/completions", 400, "prompt"),
    ({"messages": "hi"}, "/v1/chat/completions", 400, "messages"),
    ({"messages": []}, "/v1/chat/completions", 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "/v1/chat/completions", 400, "messages"),
    ({"messages": [{"role": "user", "content": 7}]}, "/v1/chat/completions", 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     "/v1/chat/completions", 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "/v1/chat/completions", 400, "max_tokens"),
]


def test_bad_inputs_get_their_status_and_the_server_still_answers(server):
    ok = {"prompt": "hi", "max_tokens": 3, "temperature": 0}
    for body, path, status, field in BAD:
        r = server.post(path, content=body if isinstance(body, bytes) else json.dumps(body),
                        headers={"Content-Type": "application/json"})
        assert r.status_code == status, (body, r.status_code, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error", err
        if field is not None:
            assert err["param"] == field, (body, err)
        assert server.post("/v1/completions", ok).status_code == 200  # still serving
    long = server.post("/v1/completions", {"prompt": list(range(3, 3 + MAX_LENGTH))}).json()["error"]
    assert long["code"] == "context_length_exceeded" and f"max_length={MAX_LENGTH}" in long["message"]
    # API key: missing or wrong -> 401, health stays open
    for h in ({}, {"Authorization": "Bearer nope"}, {"Authorization": KEY}):
        r = httpx.post(server.base + "/v1/completions", json=ok, headers=h, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.base + "/v1/models", timeout=30).status_code == 401
    assert server.health()["status"] == "ok"


def test_max_tokens_is_capped_at_the_context_left(server):
    ids = [5, 6, 7, 8]
    r = server.post("/v1/completions", {"prompt": ids, "max_tokens": 100000, "temperature": 0}).json()
    n = r["usage"]["completion_tokens"]
    assert r["choices"][0]["finish_reason"] == "stop" or n == MAX_LENGTH - len(ids)
    assert n <= MAX_LENGTH - len(ids)
    r = server.post("/v1/completions", {"prompt": ids, "max_tokens": 100000, "temperature": 0, "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == MAX_LENGTH - len(ids)  # the context left, exactly
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert server.output(full=True).count("capped") == 1  # said once in the log


def test_full_queue_gets_429_and_everything_accepted_completes(server):
    body = {"prompt": [5, 6, 7, 8], "max_tokens": MAX_LENGTH - 4, "temperature": 0}

    def ask(_):
        return server.post("/v1/completions", body, timeout=300)

    with ThreadPoolExecutor(40) as ex:
        rs = list(ex.map(ask, range(40)))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429} and codes.count(429) >= 40 - 8 - 16, codes
    assert codes.count(200) >= 8
    assert all(r.json()["error"]["type"] == "rate_limit_error" for r in rs if r.status_code == 429)
    assert server.health()["active"] == 0


def test_client_disconnect_mid_stream_frees_the_slot(server):
    # A starved client (this VM is shared) may read its 3 chunks only after the 253 tokens are all
    # generated, and then nothing is left to cancel: up to 3 tries, one must cancel.
    for attempt in range(3):
        before = server.health()
        with httpx.stream("POST", server.base + "/v1/completions", headers=server.headers, timeout=60,
                          json={"prompt": [5, 6, 7], "max_tokens": MAX_LENGTH - 3, "temperature": 0.7, "seed": 3,
                                "ignore_eos": True, "stream": True}) as resp:
            it = resp.iter_lines()
            got = [next(it) for _ in range(3)]  # a few chunks, then hang up
        assert got[0].startswith("data: ")
        deadline = time.monotonic() + 30
        while (h := server.health())["active"] != 0:
            assert time.monotonic() < deadline, json.dumps(h)
            time.sleep(0.1)
        if h.get("finished_cancelled", 0) == before.get("finished_cancelled", 0) + 1:
            break
        assert h.get("finished_length", 0) == before.get("finished_length", 0) + 1, json.dumps([before, h])
    else:
        pytest.fail(f"3 disconnects, none cancelled its request: {json.dumps(h)}")
    assert server.post("/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_nothing_compiles_after_start_up(server):
    """Every shape a request can take was compiled by the warm-up (JAX_LOG_COMPILES in the log)."""
    log = server.output(full=True)
    assert "Compiling" in log.split("listening on")[0]  # the flag works: the warm-up compiled
    assert "Compiling" not in log.split("listening on")[1]


def test_adapter_is_loaded_and_merged(toy, tmp_path):
    """--adapter: a PEFT LoRA adapter merged into the served weights gives the adapted model's logits."""
    import jax
    import jax.numpy as jnp

    from llama_jax import lora
    from llama_jax.serve.server import load_inference_model

    d, model, _, _ = toy
    m = lora.apply(llama_jax.load(d), rank=2, alpha=4, targets=("q_proj", "down_proj"))
    for i, mod in enumerate((m.layers.self_attn.q_proj.lora, m.layers.mlp.down_proj.lora)):
        mod.b.set_value(jax.random.normal(jax.random.key(i), mod.b.get_value().shape) * 0.2)
    lora.save_peft(m, tmp_path / "adapter")
    m.eval()
    ids = jnp.asarray([[5, 6, 7, 8, 9]])
    want = np.asarray(m(ids))
    served = load_inference_model(d, adapter=tmp_path / "adapter")
    assert not lora.has_lora(served)
    np.testing.assert_allclose(np.asarray(served(ids)), want, atol=1e-4)
    assert not np.allclose(np.asarray(model(ids)), want, atol=1e-3)


def test_stop_strings_end_the_text_before_them(server, toy, refs):
    _, _, tok, _ = toy
    _, (full,) = reference(refs, tok, [tok(COMPLETION)["input_ids"]], REF_TOKENS)
    k = len(full) // 2
    stop = full[k:k + 3]
    want = full[:full.index(stop)]
    body = {"prompt": COMPLETION, "max_tokens": REF_TOKENS, "temperature": 0, "stop": [stop, "\x00never"]}
    r = server.post("/v1/completions", body).json()
    assert (r["choices"][0]["text"], r["choices"][0]["finish_reason"]) == (want, "stop")
    assert r["usage"]["completion_tokens"] < REF_TOKENS
    with httpx.stream("POST", server.base + "/v1/completions", headers=server.headers, timeout=60,
                      json=dict(body, stream=True)) as resp:
        chunks = [json.loads(ln[6:]) for ln in resp.iter_lines() if ln.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want  # nothing of the stop string leaked


def test_engine_on_a_mesh_gives_the_single_device_tokens():
    """`serve --mesh`: weights sharded fsdp=2 x tensor=2 (the slots' cache replicated); greedy tokens of
    three concurrent requests equal the one-device engine's, token for token."""
    import dataclasses

    import jax

    from llama_jax.serve.engine import Engine, EngineConfig, Request
    from llama_jax.sharding import make_mesh

    cfg = dataclasses.replace(llama_jax.preset("toy"), vocab_size=256, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=128)
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    prompts = [[1, 5, 9, 33], [1, 7], [1, 100, 101, 102, 103, 104, 105]]

    class Tok:
        eos_token_id = 2

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    outs = []
    for model in (llama_jax.init_model(cfg, seed=3), llama_jax.init_model(cfg, seed=3, mesh=mesh)):
        engine = Engine(model, Tok(), EngineConfig(4, 64, 8, (16,))).start()
        try:
            reqs = [engine.submit(Request(prompt_ids=p, max_tokens=12, temperature=0.0, ignore_eos=True))
                    for p in prompts]
            t0 = time.time()
            while any(r.finish_reason is None for r in reqs) and time.time() - t0 < 300:
                time.sleep(0.02)
            outs.append([list(r.output_ids) for r in reqs])
        finally:
            engine.shutdown()
    assert "tensor" in str(llama_jax.init_model(cfg, seed=3, mesh=mesh).layers.self_attn.q_proj.kernel[...].sharding)
    assert all(len(o) == 12 for o in outs[0])
    assert outs[0] == outs[1]

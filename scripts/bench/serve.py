"""`llama-jax serve` throughput with 1, 4 and 16 concurrent clients vs transformers generate one
request at a time (the peer; `transformers serve` needs its own extras and a hub model id).

Model: the decode bench model (preset "bench-cpu": hidden 512, 8 layers, vocab 32000, untied
lm_head), random init, saved with save_hf and loaded by both sides (the same weights).  Each
request: a 16-token prompt (random ids, as scripts/bench/decode.py), 128 new tokens, greedy,
EOS ignored (llama_jax: the `ignore_eos` request extension; transformers: eos_token_id=None), so
every request yields exactly 128 tokens.

    server:        llama-jax serve --max-batch 16 --max-length 256 --prefill-buckets 16
                   (a subprocess, fp32), requests over loopback HTTP (/v1/completions, token-id prompts)
                   from C client threads, each sending --per-client requests back to back
    transformers:  LlamaForCausalLM fp32 (sdpa), generate(do_sample=False, max_new_tokens=128) per
                   request, one at a time, torch default threads

tokens/s = generated tokens / wall time of the whole wave (HTTP, prefill, queueing included).
Rounds interleave the contenders (server C=1, C=4, C=16, transformers), and the ratios are taken
per round (paired), then the median: the machine's background load drifts.  Greedy parity: the
server's text for prompt 0 equals transformers' tokens decoded with the same tokenizer.

    .venv/bin/python scripts/bench/serve.py [--rounds 3] [--per-client 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

PROMPT_LEN, NEW_TOKENS, CLIENTS = 16, 128, (1, 4, 16)


def prompts(n):
    import numpy as np

    return np.random.default_rng(0).integers(3, 32000, (n, PROMPT_LEN)).tolist()


def server_wave(base, c, per_client, P):
    import httpx

    n = c * per_client
    results = [None] * n

    def worker(w):
        with httpx.Client(timeout=600) as h:
            for i in range(w, n, c):
                r = h.post(base + "/v1/completions", json={"prompt": P[i], "max_tokens": NEW_TOKENS,
                                                           "temperature": 0, "ignore_eos": True})
                results[i] = r.json()

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(w,)) for w in range(c)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    wall = time.perf_counter() - t0
    toks = sum(r["usage"]["completion_tokens"] for r in results)
    assert toks == n * NEW_TOKENS, toks
    return toks / wall, results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-client", type=int, default=2, help="requests each client sends in a wave")
    ap.add_argument("--hf-requests", type=int, default=2, help="transformers requests per round")
    data = Path(os.environ.get("LLAMA_JAX_DATA", REPO.parent / "shared" / "data"))
    ap.add_argument("--tokenizer", default=str(data / "llama2-tokenizer" / "tokenizer.model"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import llama_jax
    import torch
    import transformers
    from serve_util import Server

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        ckpt = tmp / "bench-cpu"
        llama_jax.save_hf(llama_jax.init_model(llama_jax.preset("bench-cpu"), seed=0), ckpt)
        P = prompts(max(CLIENTS) * args.per_client)
        t0 = time.perf_counter()
        srv = Server(["--model", str(ckpt), "--tokenizer", args.tokenizer, "--max-batch", "16", "--max-length", "256",
                     "--prefill-buckets", "16", "--max-queue", "64"], tmp / "serve.log")
        start_s = time.perf_counter() - t0
        hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa").eval()
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0

        def hf_wave(n):
            t = time.perf_counter()
            outs = []
            with torch.no_grad():
                for i in range(n):
                    ids = torch.tensor([P[i]])
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=NEW_TOKENS)
                    outs.append(out[0, PROMPT_LEN:].tolist())
                    assert len(outs[-1]) == NEW_TOKENS
            return n * NEW_TOKENS / (time.perf_counter() - t), outs

        # warm-up (untimed): both sides once; parity of the greedy tokens (as text) on prompt 0
        _, hf_out = hf_wave(1)
        _, res = server_wave(srv.base, 1, 1, P)
        from llama_jax.text import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        parity = res[0]["choices"][0]["text"] == tok.decode(hf_out[0], skip_special_tokens=True)
        rounds = []
        for r in range(args.rounds):
            row = {"loadavg_1m": os.getloadavg()[0]}
            for c in CLIENTS:
                row[f"serve_c{c}"], _ = server_wave(srv.base, c, args.per_client, P)
            row["hf_1at1"], _ = hf_wave(args.hf_requests)
            rounds.append(row)
            print(json.dumps({k: round(v, 1) for k, v in row.items()}), flush=True)
        srv.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    ratios = {"c16_over_c1": statistics.median(r["serve_c16"] / r["serve_c1"] for r in rounds),
              "c16_over_hf": statistics.median(r["serve_c16"] / r["hf_1at1"] for r in rounds),
              "c1_over_hf": statistics.median(r["serve_c1"] / r["hf_1at1"] for r in rounds)}
    print(f"\nserver start-up (load + warm-up compile): {start_s:.1f} s; greedy text == transformers: {parity}")
    print("| contender | tokens/s (median of rounds) |\n|---|---:|")
    for c in CLIENTS:
        print(f"| llama-jax serve, {c} concurrent client{'s' if c > 1 else ''} | {med[f'serve_c{c}']:.0f} |")
    print(f"| transformers generate, one request at a time | {med['hf_1at1']:.0f} |")
    print("paired ratios (median over rounds): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "median": med, "ratios": ratios,
                                               "startup_s": start_s, "parity": parity,
                                               "torch_threads": torch.get_num_threads(), "cores": os.cpu_count()},
                                              indent=2))


if __name__ == "__main__":
    main()

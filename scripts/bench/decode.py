"""Greedy decoding throughput vs transformers, and vs the memory-bandwidth bound.

Model: preset "bench-cpu" (hidden 512, 8 layers, vocab 32000, untied lm_head), random init
(llama_jax init saved with save_hf, loaded by transformers: the same weights on both sides).
Prompts: 16 random token ids per row; batch 1 (row 0) and batch 8; 128 new tokens, greedy, no
EOS stop (llama_jax eos_ids=[]; HF generation_config.eos_token_id=None), so every row produces
exactly 128 tokens.  tokens/s = 128 * batch / wall time of one full generate call (prefill
included, compilation excluded: each contender runs once untimed first).

    llama_jax:    llama_jax.generate(model, prompts, max_new_tokens=128, temperature=0, eos_ids=[])
    transformers: model.generate(ids, attention_mask, do_sample=False, max_new_tokens=128)
                  (LlamaForCausalLM fp32, attn_implementation="sdpa", torch default threads)

Bound: a decode step must read every weight except the embedding table (only B rows of it are
gathered) plus the KV cache; at the average cache length (prompt + new/2) that is
    bytes/step = bytes(weights - embedding) + B * d * itemsize + 2 * L * B * avg_len * kv_heads * head_dim * itemsize
and bound tokens/s = B * read_bandwidth / bytes_per_step, with read_bandwidth measured in the same
run (jitted jnp.sum over 1 GiB, best of the run; a probe worker interleaved with the contenders).

Contenders run in separate processes, interleaved round by round (common.py).  Besides the
headline generate() numbers, llama_jax contenders also time prefill and the decode while-loop
separately (--split), which is where the per-step cost shows.

The decode loop as shipped slices the layer-stacked weights once per call on CPU
(`generate.decoder`) and keeps one KV buffer per layer in [B, kv_heads, S, head_dim], read in
place by the attention (earlier diagnostic contenders measured both changes before they shipped).
Probe contenders (names starting "probe-") time only the step's weight matmuls, the floor for
any decode loop built from XLA:CPU dots.

    .venv/bin/python scripts/bench/decode.py [--contenders ...] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

PRESET = "bench-cpu"
PROMPT_LEN, NEW_TOKENS, BATCHES = 16, 128, (1, 8)

NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="  # XLA flag: no YNNPACK fusions, dots go to Eigen
# name -> (kind, dtype, description[, XLA_FLAGS])
CONTENDERS = {
    "hf": ("hf", "float32", "transformers generate(do_sample=False), fp32, sdpa"),
    "jax-fp32": ("jax", "float32", "llama_jax.generate, fp32 (scan_layers=True)"),
    "jax-bf16": ("jax", "bfloat16", "llama_jax.generate, bf16 params + compute + KV cache"),
    "jax-int8": ("jax", "float32", "llama_jax.generate, int8 weights (per channel, weight-only), fp32 compute"),
    "jax-int8-bf16": ("jax", "bfloat16", "llama_jax.generate, int8 weights (per channel, weight-only), bf16 compute"),
    "jax-fp32-noscan": ("jax", "float32", "llama_jax.generate, fp32, scan_layers=False"),
    "jax-fp32-eigen": ("jax", "float32", "llama_jax.generate, fp32, YNNPACK fusions off (Eigen dots)", NO_YNN),
    "probe-mm": ("mm", "float32", "PROBE: only the step's weight matmuls (56 + lm_head), 127 steps in a fori_loop"),
    "probe-mm-eigen": ("mm", "float32", "PROBE: as probe-mm, YNNPACK fusions off (Eigen dots)", NO_YNN),
}
DEFAULT_CONTENDERS = "hf,jax-fp32,jax-fp32-eigen,jax-bf16,probe-mm,probe-mm-eigen"


def prompts():
    import numpy as np

    return np.random.default_rng(0).integers(3, 32000, (max(BATCHES), PROMPT_LEN), dtype=np.int32)


# ----------------------------------------------------------------------------- bound
def bytes_per_step(cfg, batch: int, itemsize: int) -> dict:
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    weights = (cfg.num_params(include_embeddings=True) - cfg.vocab_size * cfg.hidden_size) * itemsize
    if cfg.tie_word_embeddings:  # the tied table is read whole by the output projection
        weights += cfg.vocab_size * d * itemsize
    emb_rows = batch * d * itemsize
    avg_len = PROMPT_LEN + NEW_TOKENS / 2
    kv = 2 * L * batch * avg_len * cfg.num_key_value_heads * cfg.head_dim * itemsize
    return {"weights": weights, "embedding_rows": emb_rows, "kv_cache_avg": kv, "avg_cache_len": avg_len,
            "total": weights + emb_rows + kv}


# ----------------------------------------------------------------------------- llama_jax workers
def _jax_setup(spec):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import llama_jax
    from llama_jax.generate import SamplingParams, decoder, left_pad, prefill
    from llama_jax.model import Cache

    model = llama_jax.load(spec["ckpt"], dtype=spec["dtype"], scan_layers=spec.get("scan_layers", True))
    if spec.get("quantization"):  # weight-only: every Linear's kernel int8 (embedding table as loaded)
        from llama_jax.quant import quantize_model

        quantize_model(model, spec["quantization"])
    cfg = model.config
    P = prompts()
    graphdef, state = nnx.split(model)

    def split_run(b):
        """prefill and decode timed separately (same calls generate() makes)."""
        ids, mask = left_pad([list(r) for r in P[:b]], 0)
        cache = Cache.init(cfg, b, ids.shape[1] + NEW_TOKENS)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        logits, cache = prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), cache)
        jax.block_until_ready(logits)
        t1 = time.perf_counter()
        positions = jnp.asarray(mask.sum(-1), jnp.int32)
        sp = SamplingParams(NEW_TOKENS, 0.0, 0, 1.0)
        dec, hoist = decoder()
        out, _ = dec(graphdef, state, cache, logits, positions, jax.random.key(0), sp, (), 0, None, hoist_layers=hoist)
        out = np.asarray(out)
        t2 = time.perf_counter()
        return out, t1 - t0, t2 - t1

    def generate(b):
        return np.asarray(llama_jax.generate(model, [list(r) for r in P[:b]], max_new_tokens=NEW_TOKENS,
                                             temperature=0.0, eos_ids=[]))

    tokens = {}
    for b in BATCHES:  # compile + warm up both paths
        tokens[b] = generate(b).tolist()
        split_run(b)

    def step():
        res = {}
        for b in BATCHES:
            t0 = time.perf_counter()
            out = generate(b)
            res[f"gen_s_b{b}"] = time.perf_counter() - t0
            assert out.shape == (b, NEW_TOKENS), out.shape
            if spec.get("split", True):
                _, tp, td = split_run(b)
                res[f"prefill_s_b{b}"], res[f"decode_s_b{b}"] = tp, td
        return res

    info = {"tokens": {str(b): t for b, t in tokens.items()}, "jax": jax.__version__,
            "param_dtype": cfg.param_dtype, "dtype": cfg.dtype, "scan_layers": cfg.scan_layers,
            "quantization": spec.get("quantization"),
            "itemsize": 1 if spec.get("quantization") == "int8" else jnp.dtype(cfg.param_dtype).itemsize, "xla_flags": os.environ.get("XLA_FLAGS", "")}
    return step, info


# ----------------------------------------------------------------------------- transformers worker
def _hf_setup(spec):
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(spec["ckpt"], dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None  # never stop early: exactly NEW_TOKENS per row
    model.generation_config.pad_token_id = 0
    P = torch.from_numpy(prompts()).long()

    def generate(b):
        ids = P[:b]
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        return out[:, PROMPT_LEN:].numpy()

    tokens = {b: generate(b).tolist() for b in BATCHES}

    def step():
        res = {}
        for b in BATCHES:
            t0 = time.perf_counter()
            out = generate(b)
            res[f"gen_s_b{b}"] = time.perf_counter() - t0
            assert out.shape == (b, NEW_TOKENS), out.shape
        return res

    return step, {"tokens": {str(b): t for b, t in tokens.items()}, "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "transformers": transformers.__version__,
                  "attn_implementation": model.config._attn_implementation, "itemsize": 4}


def _mm_setup(spec):
    """The weight matmuls of one decode step (same shapes as the model, separate weight arrays, a
    dependency chain through them), NEW_TOKENS - 1 steps in a fori_loop: what XLA's matmul kernels
    alone achieve against the bandwidth bound.  Reported as decode-loop time (prefill 0)."""
    import jax
    import jax.numpy as jnp

    import llama_jax

    cfg = llama_jax.preset(PRESET)
    d, f, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    shapes = [s for _ in range(L) for s in [(d, d)] * 4 + [(d, f), (d, f), (f, d)]]
    key = jax.random.key(0)
    ws = [jax.random.normal(jax.random.fold_in(key, i), s, jnp.float32) * 0.02 for i, s in enumerate(shapes)]
    lm = jax.random.normal(key, (d, V), jnp.float32) * 0.02

    @jax.jit
    def chain(x, ws, lm):
        def body(_, x):
            h = x
            for j in range(0, len(ws), 7):
                h = h + (h @ ws[j] + h @ ws[j + 1] + h @ ws[j + 2]) @ ws[j + 3]
                h = h + (jax.nn.silu(h @ ws[j + 4]) * (h @ ws[j + 5])) @ ws[j + 6]
            return x + (h @ lm)[:, :d] * 1e-3
        return jax.lax.fori_loop(0, NEW_TOKENS - 1, body, x)

    xs = {b: jnp.ones((b, d), jnp.float32) for b in BATCHES}
    for b in BATCHES:
        jax.block_until_ready(chain(xs[b], ws, lm))

    def step():
        res = {}
        for b in BATCHES:
            t0 = time.perf_counter()
            jax.block_until_ready(chain(xs[b], ws, lm))
            res[f"gen_s_b{b}"] = res[f"decode_s_b{b}"] = time.perf_counter() - t0
            res[f"prefill_s_b{b}"] = 0.0
        return res
    return step, {"itemsize": 4, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _bw_setup(spec):
    import jax
    import jax.numpy as jnp

    x = jnp.ones((spec["nbytes"] // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()

    def step():  # best of 3 reductions
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            f(x).block_until_ready()
            ts.append(time.perf_counter() - t0)
        return {"best_s": min(ts)}
    return step, {"nbytes": x.nbytes}


def _ckpt_setup(spec):
    import llama_jax

    cfg = llama_jax.preset(PRESET)
    llama_jax.save_hf(llama_jax.init_model(cfg, seed=0), spec["path"])
    return (lambda: None), {}


def _worker_setup(spec):
    return {"hf": _hf_setup, "jax": _jax_setup, "bw": _bw_setup, "ckpt": _ckpt_setup,
            "mm": _mm_setup}[spec["kind"]](spec)


# ----------------------------------------------------------------------------- coordinator
def _agreement(a, b):
    """(identical tokens / total, mean length of the identical prefix per row)."""
    tot = same = 0
    prefix = []
    for ra, rb in zip(a, b):
        tot += len(ra)
        same += sum(x == y for x, y in zip(ra, rb))
        k = 0
        while k < min(len(ra), len(rb)) and ra[k] == rb[k]:
            k += 1
        prefix.append(k)
    return same / max(tot, 1), sum(prefix) / max(len(prefix), 1)


def run(names, rounds=3, split=True, budget_s=270.0, nbytes=1 << 30, quiet_wait_s=0.0, log=print):
    import llama_jax

    t_start = time.time()
    cfg = llama_jax.preset(PRESET)
    tmp = tempfile.mkdtemp(prefix="bench_decode_")
    ckpt = os.path.join(tmp, "ckpt")
    foreign_before = common.foreign_load_now(1.0)
    workers, ready = [], {}
    try:
        w = common.Worker("ckpt", __file__, {"kind": "ckpt", "path": ckpt}, log=log)
        w.wait_ready()
        w.close()
        workers.append(common.Worker("bw", __file__, {"kind": "bw", "nbytes": nbytes}, log=log))
        for name in names:
            kind, dtype, _, *flags = CONTENDERS[name]
            spec = {"kind": kind, "ckpt": ckpt, "dtype": dtype, "split": split,
                    "scan_layers": not name.endswith("noscan"), "quantization": "int8" if "int8" in name else None}
            workers.append(common.Worker(name, __file__, spec, env={"XLA_FLAGS": flags[0] if flags else ""}, log=log))
        for w in workers:
            ready[w.name] = w.wait_ready()
            log(f"[bench] {w.name} ready")
        res = common.interleave(workers, rounds, log=log, deadline=t_start + budget_s, quiet_wait_s=quiet_wait_s)
    finally:
        for w in workers:
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)

    bw = max(ready["bw"]["nbytes"] / x["best_s"] for x in res["bw"])  # best-of over the whole run
    out = {"config": {"preset": PRESET, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS, "batches": BATCHES},
           "read_bytes_per_s": bw, "rounds_done": len(res["bw"]),
           "foreign_load_before_cores": foreign_before, "quiet_threshold_cores": common.QUIET_CORES,
           "results": {}, "machine": common.machine_info(), "raw": res}
    for name in names:
        kind, dtype, desc, *_ = CONTENDERS[name]
        item = ready[name]["itemsize"]
        used, contended = common.quiet_samples(res[name])
        r = {"description": desc, "dtype": dtype, "per_batch": {}, "samples_used": used, "contended": contended,
             "foreign_cores_median": common.med([res[name][i]["foreign_cores"] for i in used])}
        if "hf" in res and name != "hf" and kind != "mm":
            pr, pc = common.paired_quiet(res["hf"], res[name])
            r["speedup_rounds"], r["speedup_contended"] = pr, pc
        for b in BATCHES:
            gen = [res[name][i][f"gen_s_b{b}"] for i in used]
            bpb = bytes_per_step(cfg, b, item)
            bound = b * bw / bpb["total"]
            steps = NEW_TOKENS - 1 if kind == "mm" else NEW_TOKENS  # the probe runs forward passes only
            pb = {"gen_s_median": common.med(gen), "tokens_per_s": steps * b / common.med(gen),
                  "bytes_per_step": bpb, "bound_tokens_per_s": bound}
            pb["fraction_of_bound"] = pb["tokens_per_s"] / bound
            if "speedup_rounds" in r:
                pb["speedup_vs_hf"] = common.paired_ratio([res["hf"][i][f"gen_s_b{b}"] for i in r["speedup_rounds"]],
                                                          [res[name][i][f"gen_s_b{b}"] for i in r["speedup_rounds"]])
            if f"decode_s_b{b}" in res[name][used[0]]:
                dec = common.med([res[name][i][f"decode_s_b{b}"] for i in used])
                pre = common.med([res[name][i][f"prefill_s_b{b}"] for i in used])
                # the loop samples NEW_TOKENS tokens and runs NEW_TOKENS - 1 forward passes
                pb.update({"prefill_s": pre, "decode_loop_s": dec,
                           "decode_ms_per_step": 1e3 * dec / (NEW_TOKENS - 1),
                           "decode_loop_tokens_per_s": b * (NEW_TOKENS - 1) / dec,
                           "decode_loop_fraction_of_bound": b * (NEW_TOKENS - 1) / dec / bound})
            if "hf" in ready and "tokens" in ready[name] and name != "hf":
                pb["token_agreement_vs_hf"], pb["mean_identical_prefix_vs_hf"] = _agreement(
                    ready[name]["tokens"][str(b)], ready["hf"]["tokens"][str(b)])
            r["per_batch"][str(b)] = pb
        out["results"][name] = r
    out["wall_s"] = time.time() - t_start
    return out


def table(out) -> str:
    hdr = ["contender", "batch", "tokens/s", "bound tokens/s", "of bound", "vs HF (paired)",
           "prefill ms", "decode ms/step", "decode loop: of bound", "tokens = HF", "samples used", "foreign load"]
    rows = []
    for name, r in out["results"].items():
        for b, pb in r["per_batch"].items():
            sp = "-"
            if "speedup_vs_hf" in pb:
                sp = common.fmt(pb["speedup_vs_hf"], 2) + "x" + (" (contended)" if r["speedup_contended"] else "")
            rows.append([f"{name}: {r['description']}", b, common.fmt(pb["tokens_per_s"], 0),
                         common.fmt(pb["bound_tokens_per_s"], 0), f"{100 * pb['fraction_of_bound']:.0f}%", sp,
                         common.fmt(1e3 * pb["prefill_s"], 1) if "prefill_s" in pb else "-",
                         common.fmt(pb["decode_ms_per_step"], 2) if "decode_ms_per_step" in pb else "-",
                         f"{100 * pb['decode_loop_fraction_of_bound']:.0f}%" if "decode_loop_fraction_of_bound" in pb else "-",
                         f"{100 * pb['token_agreement_vs_hf']:.0f}%" if "token_agreement_vs_hf" in pb else "-",
                         f"{len(r['samples_used'])}/{out['rounds_done']}" + (" (contended)" if r["contended"] else ""),
                         common.fmt(r["foreign_cores_median"], 2)])
    s = common.markdown_table(hdr, rows)
    fp32 = next((r for r in out["results"].values() if r["dtype"] == "float32"), None)
    s += (f"\n\nRead bandwidth (jitted jnp.sum over 1 GiB, best in run) {out['read_bytes_per_s'] / 1e9:.1f} GB/s.")
    if fp32:
        s += (" Bytes/step fp32: " + ", ".join(f"B={b}: {pb['bytes_per_step']['total'] / 1e6:.1f} MB"
                                               for b, pb in fp32["per_batch"].items()) + ".")
    s += (f" Samples used = those with < {out['quiet_threshold_cores']} cores of foreign load (all, marked "
          f"contended, when fewer than 2 were quiet); wall {out['wall_s']:.0f}s.")
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contenders", default=DEFAULT_CONTENDERS, help=f"comma list from {', '.join(CONTENDERS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-split", action="store_true", help="skip the separate prefill / decode-loop timing")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="before each timed sample wait up to N s for other processes to go idle")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    out = run([c for c in args.contenders.split(",") if c], args.rounds, not args.no_split, args.budget_s,
              quiet_wait_s=args.quiet_wait)
    print(table(out))
    common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    if common.is_worker():
        common.worker_main(_worker_setup)
    else:
        main()

"""Training-step throughput: llama_jax (jitted, donated) vs transformers LlamaForCausalLM + torch AdamW.

One step = forward + backward + AdamW update, fp32 everywhere, causal-LM cross-entropy on the next
token (mean over the B*(T-1) predicted positions, exactly what HF computes for labels=input_ids),
config preset "bench-cpu" (hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 32000, untied
lm_head), batch 4 x 512 tokens.  Both sides start from the SAME weights (llama_jax init saved with
save_hf and loaded by transformers) and train on the same fixed batch, so their losses must agree
step by step; the table shows both (a check that the math is the same).

Optimizer: optax.adamw(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01) vs
torch.optim.AdamW(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01) (decay on all params).

Each contender runs in its own process (XLA flags are per process) and the contenders are
interleaved round by round (see common.py); warm-up steps (incl. compilation) are excluded;
the reported step time is the median over rounds, ratios are medians of per-round ratios.

Model FLOPs per step (PaLM appendix B convention, causal mask not discounted):
    tokens * (6 * N + 12 * L * d * T)
N = non-embedding parameters including the lm_head matmul (cfg.num_params(include_embeddings=False)),
L layers, d = heads * head_dim, T sequence length.  MFU = that / step time / measured fp32 jnp.dot
peak (a 2048^3 matmul probe interleaved with the steps; best over the run).

    .venv/bin/python scripts/bench/train_step.py [--variants jax-scan,jax-noscan,...] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

PRESET = "bench-cpu"
BATCH, SEQ = 4, 512
LR, WD, B1, B2, EPS = 1e-4, 0.01, 0.9, 0.999, 1e-8
NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="  # empty list: no YNNPACK fusions, dots go to Eigen

# name -> (llama_jax runtime options, XLA_FLAGS, description)
VARIANTS = {
    "jax-scan": (dict(scan_layers=True), "", "scan_layers=True, default XLA flags"),
    "jax-noscan": (dict(scan_layers=False), "", "scan_layers=False, default XLA flags"),
    "jax-scan-eigen": (dict(scan_layers=True), NO_YNN, "scan_layers=True, YNNPACK fusions off (Eigen dots)"),
    "jax-noscan-eigen": (dict(scan_layers=False), NO_YNN, "scan_layers=False, YNNPACK fusions off (Eigen dots)"),
    "jax-scan-remat": (dict(scan_layers=True, remat="save_dots"), "",
                       "scan_layers=True, remat=save_dots (recompute non-matmul activations)"),
    "jax-noscan-remat": (dict(scan_layers=False, remat="save_dots"), "",
                         "scan_layers=False, remat=save_dots (recompute non-matmul activations)"),
    # --- diagnostics: NOT llama_jax as shipped; they patch the loss or the attention in the worker
    # to measure what a change in llama_jax would buy (see docs/benchmarks-foundation.md) ---
    "diag-noscan-hiddenslice": (dict(scan_layers=False, _loss="hidden"), "",
                                "DIAGNOSTIC scan_layers=False, lm_head applied to h[:, :-1] (no logits slice)"),
    "diag-scan-hiddenslice": (dict(scan_layers=True, _loss="hidden"), "",
                              "DIAGNOSTIC scan_layers=True, lm_head applied to h[:, :-1] (no logits slice)"),
    "diag-noscan-einsum-attn": (dict(scan_layers=False, _attn="einsum"), "",
                                "DIAGNOSTIC scan_layers=False, attention as plain [B,N,T,S] einsums"),
}
DEFAULT_VARIANTS = "jax-scan,jax-noscan,jax-scan-eigen,jax-noscan-eigen"


def model_flops_per_step(cfg) -> float:
    n = cfg.num_params(include_embeddings=False)
    d = cfg.num_attention_heads * cfg.head_dim
    return BATCH * SEQ * (6 * n + 12 * cfg.num_hidden_layers * d * SEQ)


def batch_ids():
    import numpy as np

    return np.random.default_rng(0).integers(0, 32000, (BATCH, SEQ), dtype=np.int32)


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- llama_jax worker
def _jax_setup(spec):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import llama_jax
    from llama_jax.stages.supervised import next_token, token_cross_entropy

    runtime = dict(spec["runtime"])
    loss_kind, attn_kind = runtime.pop("_loss", "full"), runtime.pop("_attn", "lib")
    if attn_kind == "einsum":
        jax.nn.dot_product_attention = _einsum_attention  # diagnostic only
    model = llama_jax.load(spec["ckpt"], **runtime)
    graphdef, params = nnx.split(model)
    del model
    tx = optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
    opt_state = tx.init(params)

    def loss_fn(params, ids):
        model = nnx.merge(graphdef, params)
        if loss_kind == "hidden":  # diagnostic: same loss, lm_head only on the T-1 predicting positions
            logits = model.project(model(ids, return_hidden=True)[:, :-1])
            tgt = ids[:, 1:]
            nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
            return jnp.mean(nll)
        # the pretraining stage's loss: all T logits against next_token targets, last position weight 0
        w = jnp.ones(ids.shape, jnp.float32).at[:, -1].set(0.0)
        total, n = token_cross_entropy(model(ids), next_token(ids), w)
        return total / n

    def train_step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    ids = jnp.asarray(batch_ids())
    t0 = time.perf_counter()
    step_c = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, ids).compile()
    compile_s = time.perf_counter() - t0
    st = {"params": params, "opt": opt_state}

    def step():
        st["params"], st["opt"], loss = step_c(st["params"], st["opt"], ids)
        jax.block_until_ready((st["params"], st["opt"], loss))
        return {"loss": float(loss)}

    warm = [step()["loss"] for _ in range(spec["warmup"])]
    return step, {"compile_s": compile_s, "warmup_losses": warm, "rss_mib": _rss_mib(),
                  "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__}


# ----------------------------------------------------------------------------- transformers worker
def _einsum_attention(q, k, v, mask=None, is_causal=False, scale=None, implementation=None, **_):
    """Diagnostic stand-in for jax.nn.dot_product_attention: [B,T,N,H] -> plain einsums, fp32 softmax."""
    import jax
    import jax.numpy as jnp

    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if K != N:
        k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32) * scale
    if is_causal:
        mask = jnp.tril(jnp.ones((T, S), bool))[None, None]
    if mask is not None:
        s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", p, v)


def _hf_setup(spec):
    import torch
    import transformers

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model = transformers.LlamaForCausalLM.from_pretrained(spec["ckpt"], dtype=torch.float32,
                                                          attn_implementation="sdpa").train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
    ids = torch.from_numpy(batch_ids()).long()

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": float(out.loss.detach())}

    warm = [step()["loss"] for _ in range(spec["warmup"])]
    return step, {"warmup_losses": warm, "threads": torch.get_num_threads(), "rss_mib": _rss_mib(),
                  "attn_implementation": model.config._attn_implementation, "torch": torch.__version__,
                  "transformers": transformers.__version__}


def _worker_setup(spec):
    return (_hf_setup if spec["kind"] == "hf" else _jax_setup)(spec)


# ----------------------------------------------------------------------------- coordinator
def make_checkpoint(path):
    import llama_jax

    cfg = llama_jax.preset(PRESET)
    llama_jax.save_hf(llama_jax.init_model(cfg, seed=0), path)
    return cfg


def run(variants, rounds=3, warmup=2, hf=True, hf_threads=0, budget_s=270.0, max_jax_workers=2,
        quiet_wait_s=0.0, log=print):
    """Interleaved timing.  At most `max_jax_workers` llama_jax processes live at once (each holds
    ~4 GB); variants beyond that run in later groups, each group interleaved with the same HF
    worker and peak probe, so every ratio is paired within its group."""
    import llama_jax

    t_start = time.time()
    cfg = llama_jax.preset(PRESET)
    flops = model_flops_per_step(cfg)
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    ckpt = os.path.join(tmp, "ckpt")
    foreign_before = common.foreign_load_now(1.0)
    groups = [variants[i:i + max_jax_workers] for i in range(0, len(variants), max_jax_workers)] or [[]]
    fixed, ready, groups_out = [], {}, []
    try:
        # the checkpoint is written by a short-lived subprocess so the coordinator holds no JAX runtime
        w = common.Worker("ckpt", __file__, {"kind": "ckpt", "path": ckpt}, log=log)
        w.wait_ready()
        w.close()
        peak = common.Worker("peak", os.path.join(HERE, "peak.py"), {"n": 2048}, log=log)
        fixed.append(peak)
        if hf:
            fixed.append(common.Worker("hf", __file__, {"kind": "hf", "ckpt": ckpt, "warmup": warmup,
                                                        "threads": hf_threads}, log=log))
        for gi, group in enumerate(groups):
            jw = []
            try:
                for name in group:
                    runtime, flags, _ = VARIANTS[name]
                    jw.append(common.Worker(name, __file__, {"kind": "jax", "ckpt": ckpt, "runtime": runtime,
                                                             "warmup": warmup}, env={"XLA_FLAGS": flags}, log=log))
                for w in fixed + jw:  # setups (load, compile, warm-up) run concurrently; timing starts after
                    if w.name not in ready:
                        ready[w.name] = w.wait_ready()
                        log(f"[bench] {w.name} ready: {json.dumps(ready[w.name])}")
                left = budget_s - (time.time() - t_start)
                deadline = time.time() + left / (len(groups) - gi)
                r = common.interleave(fixed + jw, rounds, per_round=1, log=log, deadline=deadline,
                                      quiet_wait_s=quiet_wait_s)
                groups_out.append({"variants": group, "rounds": r})
            finally:
                for w in jw:
                    w.close()
    finally:
        for w in fixed:
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)

    fpc = ready["peak"]["flops_per_call"]
    # matmul peak: best probe over the whole run (all rounds, quiet or not: it is a best-of)
    peak_best = max(fpc / x["best_s"] for g in groups_out for x in g["rounds"]["peak"])
    rows = {}

    def summary(name, samples, losses, extra):
        used, contended = common.quiet_samples(samples)
        times = [common.med(samples[i]["times"]) for i in used]
        step_s = common.med(times)
        return {"step_s_median": step_s, "step_s_used": times, "samples_used": used, "samples_done": len(samples),
                "contended": contended, "tokens_per_s": BATCH * SEQ / step_s, "mfu": flops / step_s / peak_best,
                "losses": losses, "foreign_cores_median": common.med([samples[i]["foreign_cores"] for i in used]),
                "ready": ready[name], **extra}

    if hf:
        hf_samples = [x for g in groups_out for x in g["rounds"]["hf"]]
        hf_losses = ready["hf"]["warmup_losses"] + [x["loss"] for x in hf_samples]
        rows["hf"] = summary("hf", hf_samples, hf_losses,
                             {"description": "transformers LlamaForCausalLM (sdpa) + torch.optim.AdamW, "
                                             f"torch threads {ready['hf']['threads']}", "xla_flags": ""})
    for g in groups_out:
        R = g["rounds"]
        for name in g["variants"]:
            losses = ready[name]["warmup_losses"] + [x["loss"] for x in R[name]]
            extra = {"description": VARIANTS[name][2], "xla_flags": VARIANTS[name][1]}
            if hf:
                pr, pc = common.paired_quiet(R["hf"], R[name])
                extra["speedup_vs_hf"] = common.paired_ratio([common.med(R["hf"][i]["times"]) for i in pr],
                                                             [common.med(R[name][i]["times"]) for i in pr])
                extra["speedup_rounds"], extra["speedup_contended"] = pr, pc
                n = min(len(losses), len(hf_losses))
                extra["max_abs_loss_diff_vs_hf"] = max(abs(a - b) for a, b in zip(losses[:n], hf_losses[:n]))
            rows[name] = summary(name, R[name], losses, extra)
    return {
        "config": {"preset": PRESET, "batch": BATCH, "seq": SEQ, "dtype": "float32",
                   "params_total": cfg.num_params(), "params_nonembedding_incl_lm_head": cfg.num_params(False)},
        "model_flops_per_step": flops,
        "flops_formula": "tokens * (6 * N_nonembedding_incl_lm_head + 12 * L * d * T)",
        "peak_flops_per_s": peak_best,
        "foreign_load_before_cores": foreign_before, "quiet_threshold_cores": common.QUIET_CORES,
        "results": rows,
        "groups": [{"variants": g["variants"], "raw": g["rounds"]} for g in groups_out],
        "machine": common.machine_info(), "wall_s": time.time() - t_start,
    }


def table(out) -> str:
    hdr = ["contender", "step s (median)", "tokens/s", "speed vs HF (paired)", "MFU", "samples used",
           "foreign load (cores)", "loss step 1 → last", "max abs Δloss vs HF"]
    rows = []
    for name, r in out["results"].items():
        losses = r["losses"]
        sp = "1"
        if "speedup_vs_hf" in r:
            sp = common.fmt(r["speedup_vs_hf"], 2) + "x" + (" (contended)" if r["speedup_contended"] else "")
        rows.append([f"{name}: {r['description']}", common.fmt(r["step_s_median"], 2), common.fmt(r["tokens_per_s"], 0),
                     sp, f"{100 * r['mfu']:.0f}%",
                     f"{len(r['samples_used'])}/{r['samples_done']}" + (" (contended)" if r["contended"] else ""),
                     common.fmt(r["foreign_cores_median"], 2), f"{losses[0]:.4f} → {losses[-1]:.4f}",
                     f"{r['max_abs_loss_diff_vs_hf']:.1e}" if "max_abs_loss_diff_vs_hf" in r else "-"])
    s = common.markdown_table(hdr, rows)
    s += (f"\n\nModel FLOPs/step {out['model_flops_per_step'] / 1e9:.1f} GFLOP ({out['flops_formula']}); "
          f"fp32 jnp.dot peak (2048^3 probe, best in run) {out['peak_flops_per_s'] / 1e9:.1f} GFLOP/s; "
          f"wall {out['wall_s']:.0f}s.  Samples used = those with < {out['quiet_threshold_cores']} cores of foreign "
          "load (all samples, marked contended, when fewer than 2 were quiet).")
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list from {', '.join(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (each contender one step per round)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per contender after compilation")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--hf-threads", type=int, default=0, help="torch.set_num_threads (0 = torch default)")
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop adding rounds after this (min 2 rounds)")
    ap.add_argument("--max-jax-workers", type=int, default=2, help="llama_jax processes alive at once")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="before each timed sample wait up to N s for other processes to go idle")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    out = run(variants, args.rounds, args.warmup, not args.no_hf, args.hf_threads, args.budget_s,
              args.max_jax_workers, args.quiet_wait)
    print(table(out))
    common.write_json(args.json, out)
    return out


def _ckpt_setup(spec):
    cfg = make_checkpoint(spec["path"])
    return (lambda: None), {"params": cfg.num_params()}


if __name__ == "__main__":
    if common.is_worker():
        spec = json.loads(sys.argv[sys.argv.index("--worker") + 1])
        common.worker_main(_ckpt_setup if spec["kind"] == "ckpt" else _worker_setup)
    else:
        main()

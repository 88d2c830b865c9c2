"""bf16 training-step MFU of a ~1B-parameter Llama-2-shaped model on one GPU, through the real loop.

llama_jax: preset llama2-1b (hidden 2048, 22 layers, 16 heads, intermediate 5504, vocab 32000),
bf16 compute, fp32 parameters and AdamW moments, cuDNN flash attention (attention_impl=cudnn,
causal), remat policy `--remat`, batch `--batch` x `--seq` tokens; the step is `llama_jax.train.loop`'s
(the one every stage runs), fed random tokens.  MFU and tokens/s are the loop's own metrics
(PaLM convention: 6N + 12·L·d·T FLOPs per token, peak = the data-sheet dense bf16 figure for the
device, 989 TFLOP/s for H100 SXM).  Steps 1-3 (compilation, warm-up) are excluded.

--layout: `causal` (full rows, plain causal: cuDNN with is_causal), `padded` (right-padded rows
of random lengths in [seq/2, seq], SFT's length-bucket form: cuDNN with sequence lengths under
`--attention auto|cudnn`), `packed` (4 documents per row with segment ids: `auto` takes XLA's
dense-mask path on GPU, `cudnn` hands cuDNN the mask as a bias).  Tokens/s and MFU count every
slot, padding included, so padded and packed compare at equal shapes.

Peer (same process, after llama_jax, same shapes): transformers LlamaForCausalLM in bf16
(torch autocast off: weights bf16 — the usual HF recipe), sdpa attention, torch.optim.AdamW(fused),
gradient checkpointing on when --remat is not "none".  Skipped, and said so, without CUDA torch.

    python scripts/bench/gpu_mfu.py [--batch 8 --seq 2048 --steps 30 --remat save_dots] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run_llama_jax(args) -> dict:
    import jax

    import llama_jax
    import jax.numpy as jnp

    from llama_jax.stages.supervised import flops_per_token, next_token, token_cross_entropy
    from llama_jax.stages.pretrain import PretrainConfig, lm_loss
    from llama_jax.train.config import load_config
    from llama_jax.train.loop import Task, train

    cfg = load_config(PretrainConfig, None, [f"train.steps={args.steps}", f"train.batch_size={args.batch}",
                                       "train.log_every=1", "train.checkpoint_every=0", "train.eval_every=0",
                                       "train.lr=1e-4", "train.progress=false"])
    mc = llama_jax.preset(args.preset, dtype="bfloat16", param_dtype="float32", remat=args.remat,
                          attention_impl=args.attention, max_position_embeddings=max(args.seq, 2048))
    mesh = llama_jax.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    model = llama_jax.init_model(mc, seed=0, mesh=mesh)
    rng = np.random.default_rng(0)

    B, T = args.batch, args.seq

    class RandomTokens:
        def batch(self, step):
            t = rng.integers(3, mc.vocab_size, (B, T), dtype=np.int32)
            pos = np.broadcast_to(np.arange(T, dtype=np.int32), t.shape).copy()
            seg = np.ones_like(t)
            if args.layout == "padded":
                seg = (np.arange(T)[None] < rng.integers(T // 2, T + 1, (B, 1))).astype(np.int32)
            elif args.layout == "packed":
                cuts = np.sort(rng.integers(1, T, (B, 3)), axis=1)
                seg = 1 + (np.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1).astype(np.int32)
                starts = np.concatenate([np.zeros((B, 1), np.int64), cuts], axis=1)
                pos = (np.arange(T)[None] - np.take_along_axis(starts, seg - 1, axis=1)).astype(np.int32)
            return {"tokens": t, "segments": seg, "positions": pos}

    def loss(m, b, r):
        if args.layout == "padded":  # SFT's bucket form: attention_mask, right padding
            logits = m(b["tokens"], attention_mask=b["segments"], right_padded=True)
            w = (next_token(b["segments"]) > 0).astype(jnp.float32)
            return (*token_cross_entropy(logits, next_token(b["tokens"]), w), {})
        return (*lm_loss(m, b, segment_aware=args.layout == "packed"), {})

    task = Task("gpu-bench", loss, RandomTokens(),
                flops_per_token=flops_per_token(mc, args.seq), tokens_per_row=args.seq)
    with tempfile.TemporaryDirectory() as d:
        train(task, model, cfg, d, mesh)
        recs = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in recs if r["step"] > 3]
    return {"device": jax.devices()[0].device_kind, "params": mc.num_params(),
            "step_time_s": float(np.median([r["step_time"] for r in steady])),
            "tokens_per_sec": float(np.median([r["tokens_per_sec"] for r in steady])),
            "mfu": float(np.median([r["mfu"] for r in steady if r.get("mfu") is not None] or [float("nan")])),
            "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"]}


def run_hf(args) -> dict:
    try:
        import torch
    except ImportError:
        return {"skipped": "torch not installed"}
    if not torch.cuda.is_available():
        return {"skipped": f"torch {torch.__version__} has no CUDA here"}
    import transformers

    import llama_jax
    mc = llama_jax.preset(args.preset, max_position_embeddings=max(args.seq, 2048))
    hcfg = transformers.LlamaConfig(**{k: v for k, v in mc.to_hf_dict().items() if k != "architectures"})
    hcfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hcfg).to("cuda", torch.bfloat16)
    if args.remat != "none":
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(3, mc.vocab_size, (args.batch, args.seq), device="cuda")
    times = []
    for i in range(args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    st = float(np.median(times))
    return {"torch": torch.__version__, "transformers": transformers.__version__, "step_time_s": st,
            "tokens_per_sec": args.batch * args.seq / st}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama2-1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--remat", default="save_dots")
    ap.add_argument("--attention", default="cudnn")
    ap.add_argument("--layout", default="causal", choices=("causal", "padded", "packed"))
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = {"args": vars(args), "llama_jax": run_llama_jax(args)}
    j = res["llama_jax"]
    print(f"llama_jax  [{args.layout}, attention {args.attention}] {j['device']}: {j['params'] / 1e9:.2f}B params, step {j['step_time_s'] * 1e3:.0f} ms, "
          f"{j['tokens_per_sec']:,.0f} tokens/s, MFU {100 * j['mfu']:.1f}% (loss {j['loss_first']:.3f} -> "
          f"{j['loss_last']:.3f})")
    if not args.no_peer:
        h = res["hf"] = run_hf(args)
        if "skipped" in h:
            print(f"transformers: skipped ({h['skipped']})")
        else:
            res["speedup_vs_hf"] = j["tokens_per_sec"] / h["tokens_per_sec"]
            print(f"transformers {h['transformers']} / torch {h['torch']}: step {h['step_time_s'] * 1e3:.0f} ms, "
                  f"{h['tokens_per_sec']:,.0f} tokens/s -> llama_jax {res['speedup_vs_hf']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

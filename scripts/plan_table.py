"""Regenerate the TPU plan table of docs/plan.md (needs libtpu: `make plan-env`).

    .venv-plan/bin/python scripts/plan_table.py run  [--out runs/plan/table.jsonl] [--only 7b] [--cells N]
    .venv-plan/bin/python scripts/plan_table.py table [--out runs/plan/table.jsonl]

`run` plans each cell of {7B, 13B, 70B} x {pretrain-full, pretrain-lora, sft-lora, ppo} x
{v4, v5e, v5p}: starting from the 8-chip slice (v4-8, v5e-8, v5p-8) it climbs to larger slices of
the same generation until one fits (the smallest slice that fits), one sequence per chip
(PPO: one rollout per chip per minibatch) at the stage config's sequence length.  Every
compile's result is appended to the JSONL file as it finishes, and cells already there are
skipped, so an interrupted run resumes.  EXTRA cells (the acceptance rows) run first.
`table` prints the markdown table from the JSONL.

`run --grid issue18` plans the issue-18 grid instead: 7B / 13B / 70B at seq 2048 and 4096, splash vs
XLA attention, on v5e (70B climbs the v5e ladder), with the current defaults (save_dots, bf16 frozen
base); then the generation (prefill + decode) and PPO rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

MODELS = ("llama2-7b", "llama2-13b", "llama2-70b")
STAGES = ("pretrain-full", "pretrain-lora", "sft-lora", "ppo")
LADDERS = {  # slices tried in order until one fits
    "v4": ("v4-8", "v4-16", "v4-32", "v4-64"),
    "v5e": ("v5e-8", "v5e-16", "v5e-32", "v5e-64", "v5e-128", "v5e-256"),
    "v5p": ("v5p-8", "v5p-16", "v5p-32", "v5p-64", "v5p-128"),
}
# (model, stage, topology, seq, overrides): measured before the grid
EXTRA = [
    ("llama2-7b", "sft-lora", "v5e-8", 2048, ()),
    ("llama2-7b", "sft-lora", "v5e-8", 2048, ("model.remat=full",)),
    ("llama2-7b", "pretrain-full", "v5p-8", None, ()),
]


SPLASH, XLA = ("model.attention_impl=splash",), ("model.attention_impl=xla",)
NO_FULL = "lora.trainable_modules=[]"  # LoRA only (the 7B config trains embed_tokens / lm_head in full)
TP4 = ("mesh.tensor=4", "model.remat=full")  # 70B LoRA needs tensor parallelism (docs/plan.md, Findings)
# (model, stage, first topology, seq, overrides, climb the ladder?) in the order they run
GRID18 = [
    # LoRA SFT: 7B / 13B / 70B at 2048 and 4096, splash vs XLA
    ("llama2-7b", "sft-lora", "v5e-8", 4096, SPLASH, False),
    ("llama2-7b", "sft-lora", "v5e-8", 4096, XLA, False),
    ("llama2-13b", "sft-lora", "v5e-8", 2048, SPLASH, True),
    ("llama2-13b", "sft-lora", "v5e-8", 2048, XLA, True),
    ("llama2-7b", "sft-lora", "v5e-8", 4096, SPLASH + ("model.remat=full",), False),
    ("llama2-7b", "sft-lora", "v5e-8", 4096, XLA + ("model.remat=full",), False),
    # QLoRA: the smallest v5e slice for LoRA SFT at 2048, nf4 vs bf16 frozen base, with and without
    # embed_tokens / lm_head trained in full
    ("llama2-7b", "sft-lora", "v5e-1", 2048, SPLASH + ("quantization=nf4",), True),
    ("llama2-7b", "sft-lora", "v5e-1", 2048, SPLASH + ("quantization=nf4", NO_FULL), True),
    ("llama2-7b", "sft-lora", "v5e-1", 2048, SPLASH, True),
    ("llama2-7b", "sft-lora", "v5e-1", 2048, SPLASH + (NO_FULL,), True),
    ("llama2-13b", "sft-lora", "v5e-1", 2048, SPLASH + ("quantization=nf4",), True),
    ("llama2-13b", "sft-lora", "v5e-1", 2048, SPLASH + ("quantization=nf4", NO_FULL), True),
    # generation: prompt 2048 + 512 new tokens, one sequence per chip; scanned (default on TPU) vs
    # unrolled cached layers; bf16 vs int8 weights
    ("llama2-7b", "generate", "v5e-8", 2048, ("model.cache_layers=scan",), False),
    ("llama2-7b", "generate", "v5e-8", 2048, ("model.cache_layers=unroll",), False),
    ("llama2-7b", "generate", "v5e-8", 2048, ("quantization=int8",), False),
    ("llama2-13b", "generate", "v5e-8", 2048, (), False),
    ("llama2-70b", "generate", "v5e-8", 2048, (), True),
    ("llama2-70b", "generate", "v5e-8", 2048, ("quantization=int8",), True),
    ("llama2-70b", "generate", "v5e-16", 2048, ("model.cache_layers=unroll",), False),
    # PPO (prompt 256 + 256 new tokens), one rollout per chip per minibatch
    ("llama2-7b", "ppo", "v5e-8", None, ("model.cache_layers=scan",), False),
    ("llama2-7b", "ppo", "v5e-8", None, ("model.cache_layers=unroll",), False),
    ("llama2-7b", "ppo", "v5e-8", None, ("quantization=nf4",), False),
    ("llama2-13b", "ppo", "v5e-8", None, (), True),
    # pretraining at 2048
    ("llama2-7b", "pretrain-full", "v5p-8", 2048, SPLASH, False),
    ("llama2-7b", "pretrain-full", "v5p-8", 2048, XLA, False),
    ("llama2-7b", "pretrain-lora", "v5e-8", 2048, SPLASH, False),
    ("llama2-7b", "pretrain-lora", "v5e-8", 2048, XLA, False),
    # 70B LoRA with tensor parallelism; 4096; bigger models' full fine-tuning
    ("llama2-70b", "sft-lora", "v5e-32", 2048, SPLASH + TP4, True),
    ("llama2-70b", "sft-lora", "v5e-32", 2048, SPLASH + TP4 + ("quantization=nf4",), True),
    ("llama2-13b", "sft-lora", "v5e-16", 4096, SPLASH, True),
    ("llama2-70b", "sft-lora", "v5e-32", 4096, SPLASH + TP4, True),
    ("llama2-70b", "ppo", "v5e-32", None, ("mesh.tensor=4",), True),
    ("llama2-13b", "pretrain-full", "v5p-8", 2048, SPLASH, True),
    ("llama2-70b", "pretrain-full", "v5p-16", 2048, SPLASH, True),
]


def ladder_from(topo: str) -> tuple:
    gen = topo.split("-")[0]
    lad = (("v5e-1", "v5e-4") if gen == "v5e" else ()) + LADDERS[gen]
    return lad[lad.index(topo):]


def key(model, stage, topo, seq, overrides, batch):
    return json.dumps([model, stage, topo, seq, list(overrides), batch])


def run_cell(pl, topos, model, stage, topo_name, seq, overrides, out, done):
    """One plan; `overrides` are config overrides, plus `quantization=FMT` (the planner's
    --quantization: generate's weights, the LoRA stages' frozen base)."""
    if topo_name not in topos:
        topos[topo_name] = pl.get_topology(topo_name)
    topo = topos[topo_name]
    quant = next((o.split("=", 1)[1] for o in overrides if o.startswith("quantization=")), None)
    over = [o for o in overrides if not o.startswith("quantization=")]
    if quant and stage != "generate":
        over.append(f"model.quantization={quant}")
    cfg = pl.stage_config(stage, model, overrides=over)
    _, mesh_shape = pl._mesh(cfg, topo, None)
    batch = pl.batch_multiple(stage, cfg, mesh_shape)  # one sequence per chip (per PPO minibatch)
    k = key(model, stage, topo_name, seq, overrides, batch)
    if k in done:
        return done[k]
    t0 = time.perf_counter()
    p = pl.plan(stage, model, topo, batch=batch, seq=seq, cfg=cfg, quantization=quant if stage == "generate" else None)
    rec = {"key": k, "overrides": list(overrides), "wall_s": round(time.perf_counter() - t0, 1), **p.to_dict()}
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    done[k] = rec
    print(f"{model} {stage} {topo_name} seq={p.seq} batch={batch} {' '.join(overrides)}: "
          f"{'fits' if rec['fits'] else 'does not fit'} peak={rec['peak_bytes_per_chip']} ({rec['wall_s']} s)",
          flush=True)
    return rec


# ladders measured first (the rest of the grid follows in MODELS x STAGES x generations order)
# (model, stage, generation, climb the ladder?)
PRIORITY = [("llama2-7b", st, gen, False) for st in STAGES[:2] for gen in ("v5e", "v5p", "v4")] + [
    ("llama2-7b", st, gen, False) for gen in ("v5e", "v5p", "v4") for st in STAGES[2:]] + [
    ("llama2-70b", "sft-lora", "v5e", True), ("llama2-70b", "pretrain-full", "v5p", True),
    ("llama2-13b", "sft-lora", "v5e", True), ("llama2-13b", "pretrain-full", "v5p", True),
    ("llama2-7b", "pretrain-full", "v5e", True),
]


def cmd_run(args):
    from llama_jax import plan as pl

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done[r["key"]] = r
    topos: dict = {}
    for model, stage, topo, seq, over in EXTRA:
        if args.only and args.only not in model:
            continue
        run_cell(pl, topos, model, stage, topo, seq, over, out, done)
    if args.grid == "issue18":
        for model, stage, topo0, seq, over, climb in GRID18:
            if args.only and args.only not in model:
                continue
            for topo in ladder_from(topo0) if climb else (topo0,):
                if run_cell(pl, topos, model, stage, topo, seq, over, out, done)["fits"]:
                    break
        return
    gens = args.generations.split(",")
    ladders = [x for x in PRIORITY if x[2] in gens]
    ladders += [(m, st, g, True) for m in MODELS for st in STAGES for g in gens if (m, st, g, True) not in ladders]
    n = 0
    for model, stage, gen, climb in ladders:
        if args.only and args.only not in model:
            continue
        for topo in LADDERS[gen] if climb else LADDERS[gen][:1]:
            rec = run_cell(pl, topos, model, stage, topo, None, (), out, done)
            n += 1
            if rec["fits"] or (args.cells and n >= args.cells):
                break
        if args.cells and n >= args.cells:
            return


def _gib(b):
    return "-" if b is None else f"{b / 2**30:.1f}"


def cmd_table(args):
    rows = [json.loads(l) for l in Path(args.out).read_text().splitlines()]
    order = {m: i for i, m in enumerate(MODELS)}
    stages = {st: i for i, st in enumerate(STAGES + ("generate",))}
    rows.sort(key=lambda r: (order.get(r["model"], 9), stages.get(r["stage"], 9), r.get("seq") or 0,
                             r["overrides"], r["chips"]))
    print("| model | stage | slice (chips) | mesh | remat | batch x seq | args | temp | peak / usable HBM per chip "
          "(GiB) | fits | model TFLOPs/step | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fns = r["functions"]
        main = max((f for f in fns if f["total_bytes"] is not None), key=lambda f: f["total_bytes"], default=None)
        err = next((f for f in fns if f["error"]), None)
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1"
        seq = (f"{r['batch']} x ({r['seq']}+{r.get('max_new_tokens')})" if r["stage"] in ("ppo", "generate")
               else f"{r['batch']} x {r['seq']}")
        remat = r["remat"] + ("".join(f" ({o})" for o in r["overrides"] if not o.startswith("model.remat")))
        if err is not None:
            import re

            m = re.search(r"temporaries \(([0-9.]+G)\)", err["error"] or "")
            mem = f"OOM in compile ({err['name']}: temporaries {m.group(1) if m else '?'})"
            args_, temp = "-", "-"
        else:
            mem = f"{_gib(r['peak_bytes_per_chip'])} / {_gib(r['usable_hbm_bytes_per_chip'])}"
            args_, temp = _gib(main["args_bytes"]), _gib(main["temp_bytes"])
            if r["stage"] in ("ppo", "generate"):
                mem += f" ({main['name']})"
        comp = sum(f["compile_s"] for f in fns)
        print(f"| {r['model'].replace('llama2-', '').upper()} | {r['stage']} | {r['topology']} ({r['chips']}) | {mesh} "
              f"| {remat} | {seq} | {args_} | {temp} | {mem} | {'yes' if r['fits'] else 'no'} "
              f"| {r.get('model_flops_per_step', 0) / 1e12:.0f} | {comp:.0f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["run", "table"])
    ap.add_argument("--out", default="runs/plan/table.jsonl")
    ap.add_argument("--only", default=None, help="only models whose name contains this (e.g. 7b)")
    ap.add_argument("--generations", default="v4,v5e,v5p")
    ap.add_argument("--grid", choices=["default", "issue18"], default="default")
    ap.add_argument("--cells", type=int, default=0, help="stop after this many grid compiles (0 = all)")
    args = ap.parse_args()
    return cmd_run(args) if args.what == "run" else cmd_table(args)


if __name__ == "__main__":
    sys.exit(main())

"""`llama-jax <command>`: each stage registers its own subcommand."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cmd_generate(args) -> int:
    import llama_jax
    from .text import load_tokenizer

    model = llama_jax.load(args.model, dtype=args.dtype)
    if args.quantization:  # weight-only: every Linear kernel stored quantized (llama_jax.quant)
        from .quant import quantize_model

        quantize_model(model, args.quantization)
    tok = load_tokenizer(args.tokenizer or args.model)
    single = len(args.prompt) == 1
    out = llama_jax.generate(model, args.prompt if not single else args.prompt[0], tok,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed, stream=single)
    if not single:
        for p, o in zip(args.prompt, out):
            print(f"### {p}\n{o}\n")
    return 0


def _cmd_export(args) -> int:
    from .export import export

    out = export(args.model, args.out, peft=args.peft, step=args.step)
    print(f"exported to {out}")
    return 0


def _cmd_demo(args) -> int:
    if args.data:  # real data from a real pretrained base (llama_jax/demo_real.py)
        from .demo_real import run_real_demo

        return run_real_demo(args)
    from .demo import run_demo

    return run_demo(args)


PLAN_VENV = REPO / ".venv-plan"


def _cmd_plan(args) -> int:
    """TPU plans need libtpu, kept out of the main environment (its presence makes jax probe for a
    TPU at startup): without it, re-run the same command in .venv-plan (`make plan-env`)."""
    import importlib.util

    if args.topology != "cpu" and importlib.util.find_spec("libtpu") is None:
        exe = PLAN_VENV / "bin" / "llama-jax"
        if exe.exists() and not os.environ.get("LLAMA_JAX_PLAN_REEXEC"):
            os.environ["LLAMA_JAX_PLAN_REEXEC"] = "1"
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
            sys.stdout.flush()
            os.execv(str(exe), [str(exe), *sys.argv[1:]])
        print("llama-jax plan: libtpu is not installed in this environment. Run `make plan-env` (creates "
              f"{PLAN_VENV.name}/ with jax[tpu]), then `{PLAN_VENV.name}/bin/llama-jax plan ...` "
              "(plain `llama-jax plan` re-runs itself there once it exists).", file=sys.stderr)
        return 2
    from .plan import cmd_plan

    return cmd_plan(args)


# command -> (module under llama_jax.stages, its config class)
STAGES = {"pretrain": ("pretrain", "PretrainConfig"), "sft": ("sft", "SFTConfig"), "dpo": ("dpo", "DPOConfig"),
          "rm": ("reward", "RMConfig"), "ppo": ("ppo", "PPOConfig"), "grpo": ("grpo", "GRPOConfig")}


def _cmd_stage(name):
    def run(args) -> int:
        import importlib  # a stage's module loads on use: `llama-jax --help` does not import jax

        from .train.config import format_config, load_config

        mod_name, cls_name = STAGES[name]
        mod = importlib.import_module(f"llama_jax.stages.{mod_name}")
        cfg = load_config(getattr(mod, cls_name), args.config, args.overrides)
        if args.print_config:
            print(format_config(cfg))
            return 0
        result = mod.run_config(cfg, args.out)
        print(f"{name}: done; run directory {result['run_dir']}")
        return 0
    return run


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llama-jax", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a model (HF dir or llama_jax checkpoint)")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", required=True, action="append", help="repeat for a batch; one prompt streams")
    g.add_argument("--tokenizer", help="tokenizer dir or tokenizer.model (default: the model dir)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the checkpoint's)")
    g.add_argument("--quantization", choices=("int8", "int4", "nf4"), default=None,
                   help="weight-only quantized Linear kernels (dequantised in the matmul)")
    g.set_defaults(func=_cmd_generate)

    for name, help_ in (("pretrain", "continued pretraining on packed text"),
                        ("sft", "supervised fine-tuning on chat data (full or LoRA)"),
                        ("dpo", "direct preference optimisation (sigmoid, hinge, ipo)"),
                        ("rm", "reward model on preference pairs (Bradley-Terry scalar head)"),
                        ("ppo", "PPO (RLHF) from an SFT model with a reward model or reward function"),
                        ("grpo", "GRPO (group-relative, no critic) with a reward function or reward model"),):
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", help="YAML run config (see configs/)")
        p.add_argument("--out", default=None, help="run directory (rerunning the same command resumes)")
        p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=100")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config (every option, its value and what it does) and exit")
        p.set_defaults(func=_cmd_stage(name))

    pl = sub.add_parser("plan", help="ahead-of-time TPU memory / FLOPs plan of a stage's real training step")
    pl.add_argument("--model", default="llama2-7b", help="preset: llama2-7b, llama2-13b, llama2-70b (default llama2-7b)")
    pl.add_argument("--stage", default="sft-lora",
                    help="pretrain-full, pretrain-lora, sft-lora, ppo, generate (default sft-lora)")
    pl.add_argument("--topology", default="v5e:2x4",
                    help="TPU slice: v5e:2x4, v5e-8, v4-8, v5p-8, v5p:2x2x2, v6e-8, ... or cpu (default v5e:2x4)")
    pl.add_argument("--batch", type=int, default=None, help="global batch (default: the stage config's)")
    pl.add_argument("--seq", type=int, default=None,
                    help="sequence length (default: the config's block_size / max_length; PPO, generate: prompt length)")
    pl.add_argument("--new-tokens", type=int, default=None, help="generate: tokens decoded (default 512)")
    pl.add_argument("--quantization", choices=("int8", "int4", "nf4"), default=None,
                    help="generate: weight-only quantized kernels; LoRA stages: the frozen base (QLoRA)")
    pl.add_argument("--mesh", default=None, help="mesh override, e.g. data=1,fsdp=4,tensor=2 (default: the "
                    "config's, fsdp over all chips)")
    pl.add_argument("--find-batch", action="store_true", help="find the largest global batch that fits")
    pl.add_argument("--vocab-size", type=int, default=55296,
                    help="vocabulary (default 55296, Chinese-LLaMA-2's; 0 = the preset's 32000)")
    pl.add_argument("--config", default=None, help="stage YAML (default configs/chinese-llama2-7b/<stage>.yaml)")
    pl.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. model.remat=full")
    pl.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")
    pl.set_defaults(func=_cmd_plan)

    e = sub.add_parser("export", help="run directory / checkpoint -> HF directory (merged) or PEFT adapter")
    e.add_argument("--model", required=True, help="a run directory, llama_jax checkpoint or HF directory")
    e.add_argument("--out", required=True)
    e.add_argument("--peft", action="store_true", help="write the LoRA adapter in PEFT format instead of merging")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    e.set_defaults(func=_cmd_export)

    c = sub.add_parser("chat", help="multi-turn chat in the terminal (streamed, KV cache kept across turns)")
    c.add_argument("--model", required=True)
    c.add_argument("--tokenizer", help="tokenizer dir or tokenizer.model (default: the model dir)")
    c.add_argument("--template", default=None, help="llama2-chat, chinese-alpaca-2, alpaca, tokenizer (default: the "
                   "one recorded in the model dir by export, else the tokenizer's own, else chinese-alpaca-2)")
    c.add_argument("--system", default=None, help="system prompt (default: the template's)")
    c.add_argument("--max-new-tokens", type=int, default=512)
    c.add_argument("--temperature", type=float, default=0.7)
    c.add_argument("--top-k", type=int, default=0)
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--dtype", default=None)
    c.add_argument("--quantization", choices=("int8", "int4", "nf4"), default=None,
                   help="weight-only quantized Linear kernels (dequantised in the matmul)")
    c.set_defaults(func=lambda a: __import__("llama_jax.chat_cli", fromlist=["run_chat"]).run_chat(a))

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching (docs/serve.md)")
    sv.add_argument("--model", required=True, help="HF dir or llama_jax checkpoint")
    sv.add_argument("--adapter", default=None, metavar="PEFT_DIR", help="PEFT LoRA adapter, merged at load")
    sv.add_argument("--tokenizer", help="tokenizer dir or tokenizer.model (default: the model dir)")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, default=16, help="slots: requests decoded together")
    sv.add_argument("--max-length", type=int, default=4096, help="tokens per slot, prompt + reply (capped at "
                    "the model's context)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; beyond: HTTP 429")
    sv.add_argument("--prefill-buckets", default=None, metavar="N,N,...",
                    help="prompt pad lengths compiled at start-up (default: 16, 32, 64, ... up to max-length)")
    sv.add_argument("--template", default=None, help="chat template: llama2-chat, chinese-alpaca-2, alpaca, "
                    "tokenizer (default: the one recorded in the model dir by export, else the tokenizer's own, "
                    "else chinese-alpaca-2)")
    sv.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the checkpoint's)")
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    sv.add_argument("--mesh", default=None, metavar="data=1,fsdp=-1,tensor=1",
                    help="shard the weights over a device mesh (default: one device)")
    sv.add_argument("--served-model-name", default=None, help="model id in the API (default: the model dir's name)")
    sv.set_defaults(func=lambda a: __import__("llama_jax.serve.server", fromlist=["run_serve"]).run_serve(a))

    d = sub.add_parser("demo", help="the whole pipeline (tokenizer -> pretrain -> SFT -> RM -> PPO -> GRPO) on a "
                                    "built-in task")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--data", default=None,
                   help="run on the real data of DIR (../shared/data layout) from a real pretrained base "
                        "(--base) instead of the built-in synthetic task")
    d.add_argument("--base", default=None, metavar="stories260K|DIR|FILE.bin",
                   help="with --data: the pretrained base: stories260K (default: DATA/models/stories260K, "
                        "converted from llama2.c), an HF Llama dir with a sentencepiece tokenizer.model (LLaMA-2) or "
                        "a byte-level BPE tokenizer.json (SmolLM2), or a llama2.c .bin with tokenizer.model beside it")
    d.add_argument("--base-tokenizer", default=None,
                   help="base tokenizer.model (default: DATA/llama2-tokenizer, else a small one trained on the fly)")
    d.add_argument("--ppo-reward", choices=["auto", "rm", "exact"], default="auto",
                   help="PPO's reward: the trained reward model, or the task's exact-match checker "
                        "(auto: rm; the built-in task's checker then drives the GRPO stage)")
    d.add_argument("--size", choices=["default", "tiny"], default="default",
                   help="tiny: a few steps per stage (a smoke test of the whole pipeline)")
    d.add_argument("--seed", type=int, default=None, help="seed of the data and every stage (default 0)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --data: change one of the run's sizes (llama_jax.demo_real.RealSizes: steps, "
                        "lengths, en_replay share, ...); repeatable")
    d.set_defaults(func=_cmd_demo)

    def _cmd_resize(args) -> int:
        from .vocab_resize import cmd_resize  # imported on use: keeps `llama-jax --help` light

        return cmd_resize(args)

    r = sub.add_parser("resize", help="grow a model's embeddings / lm_head to a merged (extended) tokenizer")
    r.add_argument("--model", required=True, metavar="IN", help="HF model dir or llama_jax checkpoint")
    r.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="merged tokenizer: dir with tokenizer.model (+ HF files) or a tokenizer.model")
    r.add_argument("--out", required=True, metavar="OUT", help="HF directory to write (atomically)")
    r.add_argument("--base-tokenizer", default=None, metavar="PATH",
                   help="tokenizer.model the model was trained with (default: IN/tokenizer.model)")
    r.add_argument("--pad-to-multiple-of", type=int, default=None, metavar="N",
                   help="round the new vocab size up to a multiple of N (extra rows: mean of all rows)")
    r.set_defaults(func=_cmd_resize)

    def _cmd_convert(args) -> int:
        from .convert import cmd_convert  # imported on use: torch loads only for --format meta

        return cmd_convert(args)

    cv = sub.add_parser("convert", help="Meta's Llama-2 release (params.json + consolidated.NN.pth) or a llama2.c "
                                        ".bin -> HF directory (docs/convert.md)")
    cv.add_argument("src", metavar="SRC", help="meta: the directory with params.json; llama2c: the .bin file")
    cv.add_argument("--format", required=True, choices=["meta", "llama2c"])
    cv.add_argument("--out", required=True, metavar="DIR", help="HF directory to write (atomically)")
    cv.add_argument("--tokenizer", default=None, metavar="tokenizer.model",
                    help="sentencepiece model (default: tokenizer.model in SRC or its parent for meta, beside the "
                         ".bin for llama2c, else none)")
    cv.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="output dtype (default: the source's: bfloat16 for Meta, float32 for llama2.c)")
    cv.add_argument("--max-position-embeddings", type=int, default=None, metavar="N",
                    help="context length for config.json (default: params.json max_seq_len, else 4096; "
                         "llama2.c: its seq_len)")
    cv.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (default 5 GiB)")
    cv.set_defaults(func=_cmd_convert)

    from .stages.evaluate import add_eval_command

    add_eval_command(sub)

    from .data.cli import add_data_commands

    add_data_commands(sub)

    try:
        from .tokenizer.cli import add_tokenizer_commands
    except ImportError:
        add_tokenizer_commands = None
    if add_tokenizer_commands is not None:
        add_tokenizer_commands(sub)
    return ap


XLA_CACHE_ENV = "LLAMA_JAX_XLA_CACHE"


def xla_cache_dir() -> Path | None:
    """Where the CLI keeps XLA's persistent compilation cache: $LLAMA_JAX_XLA_CACHE ("off" disables
    it), else $XDG_CACHE_HOME/llama_jax/xla (~/.cache/...); None when disabled or when jax's own
    JAX_COMPILATION_CACHE_DIR is set (that one wins, untouched)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    v = os.environ.get(XLA_CACHE_ENV)
    if v is not None:
        return None if v.strip().lower() in ("", "off", "0", "false", "no") else Path(v).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llama_jax" / "xla"


def enable_xla_cache() -> Path | None:
    """Turn on XLA's persistent compilation cache (programs that took >= 1 s to compile, jax's
    default threshold), so a rerun with the same shapes — a resumed run, the next demo seed, the
    same stage with other data — loads its executables instead of compiling them again (measured in
    docs/benchmarks.md: the GRPO bench's first iteration).  A cached executable computes exactly
    what a fresh compile does."""
    d = xla_cache_dir()
    if d is None:
        return None
    import jax

    if jax.config.jax_compilation_cache_dir:  # set by the caller (a test, a notebook): keep it
        return Path(jax.config.jax_compilation_cache_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home: run without the cache rather than fail
        print(f"llama-jax: XLA cache {d} unavailable ({e}); compiling every run", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(d))
    return d


def main(argv=None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] == ["plan"] and "cpu" not in words:
        # TPU plans compile for a described slice; jax must not look for a TPU here (set before jax loads)
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    ap = build_parser()
    # dotted.key=value overrides may come before or after --out: collect them wherever they are
    args, unknown = ap.parse_known_args(argv)
    if unknown:
        if not hasattr(args, "overrides") or any("=" not in u or u.startswith("-") for u in unknown):
            ap.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = list(args.overrides) + unknown
    if os.environ.get("LLAMA_JAX_COORDINATOR") or os.environ.get("LLAMA_JAX_DISTRIBUTED") == "1":
        # multi-host: every process runs the same command
        from .sharding import initialize_distributed

        initialize_distributed(cpu_collectives=os.environ.get("LLAMA_JAX_CPU_COLLECTIVES") == "gloo")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command != "plan":  # plans compile for another platform once; nothing to reuse
        enable_xla_cache()
    try:
        return int(args.func(args) or 0)
    except Exception as e:
        # our loaders raise these (ValueError subclasses: ConfigError, DataError, CheckpointError, ...)
        # with the file / record / field named: show them without a traceback.  Anything else (a
        # KeyError, a TypeError, ...) is a bug and keeps its traceback.
        if isinstance(e, (ValueError, FileNotFoundError)) or type(e).__name__ in ("TrainingError", "PlanError"):
            print(f"llama-jax {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

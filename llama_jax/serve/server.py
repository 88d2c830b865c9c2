"""`llama-jax serve`: load the model (+ a PEFT adapter, merged), pick the chat template, compile
(warm-up), then serve the app on uvicorn until interrupted.  Binds 127.0.0.1 unless --host says
otherwise."""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import lora
from ..hf import load
from ..sharding import make_mesh, parse_mesh
from ..data.templates import get_template, resolve_template
from ..text import load_tokenizer
from .engine import Engine, EngineConfig

log = logging.getLogger("llama_jax.serve")


@dataclass(frozen=True)
class ServeConfig:
    model: str
    adapter: str | None = None
    tokenizer: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    max_length: int = 4096
    max_queue: int = 64
    prefill_buckets: tuple[int, ...] = ()
    template: str | None = None
    dtype: str | None = None
    api_key: str | None = None
    model_name: str | None = None
    # None: one device.  A shape such as {"fsdp": -1} loads the weights sharded over the mesh (a model
    # larger than one accelerator); the slots' KV cache is then replicated (serve.engine).
    mesh: dict | None = None


def load_inference_model(path, dtype=None, adapter=None, mesh=None):
    """llama_jax.load(path) (on `mesh` if given), with a PEFT LoRA adapter loaded and merged into
    the weights."""
    model = load(path, dtype=dtype, mesh=mesh)
    if adapter:
        lora.load_peft(model, adapter)
        model = lora.merge(model)
    return model


def build(cfg: ServeConfig, say=print):
    """(app, engine) ready to serve: the engine's scheduler is started (compiled)."""
    from .api import create_app  # imported on use: fastapi (load_inference_model works without it)

    t0 = time.perf_counter()
    mesh = None
    if cfg.mesh:
        mesh = make_mesh(cfg.mesh)
        say(f"serve: weights sharded over mesh {dict(mesh.shape)}")
    model = load_inference_model(cfg.model, cfg.dtype, cfg.adapter, mesh)
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    mcfg = model.config
    max_length = cfg.max_length
    if max_length > mcfg.max_position_embeddings and mcfg.rope_type != "dynamic":
        say(f"serve: --max-length {max_length} exceeds the model's context ({mcfg.max_position_embeddings}); "
            f"using {mcfg.max_position_embeddings}")
        max_length = mcfg.max_position_embeddings
    name, source = resolve_template(cfg.template, cfg.adapter, cfg.model, tokenizer=tok)
    template = get_template(name)
    say(f"serve: chat template {name!r} (from {source})")
    ecfg = EngineConfig(cfg.max_batch, max_length, cfg.max_queue, tuple(cfg.prefill_buckets))
    engine = Engine(model, tok, ecfg)
    say(f"serve: loaded {cfg.model} in {time.perf_counter() - t0:.1f} s; {cfg.max_batch} slots x {max_length} "
        f"tokens, prefill buckets {list(engine.buckets)}")
    t1 = time.perf_counter()
    engine.start(progress=lambda m: say(f"serve: warm-up: {m}"))
    say(f"serve: compiled in {time.perf_counter() - t1:.1f} s")
    model_name = cfg.model_name or Path(cfg.model).resolve().name
    return create_app(engine, tok, model_name=model_name, template=template, api_key=cfg.api_key), engine


def run_serve(args) -> int:
    import uvicorn  # optional serving dependency, needed only to run the server

    cfg = ServeConfig(model=args.model, adapter=args.adapter, tokenizer=args.tokenizer, host=args.host,
                      port=args.port, max_batch=args.max_batch, max_length=args.max_length, max_queue=args.max_queue,
                      prefill_buckets=tuple(int(x) for x in args.prefill_buckets.split(",")) if args.prefill_buckets
                      else (), template=args.template, dtype=args.dtype, api_key=args.api_key,
                      model_name=args.served_model_name, mesh=parse_mesh(args.mesh))
    for name in ("max_batch", "max_length", "port"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    app, engine = build(cfg, say)
    logging.getLogger("llama_jax.serve").setLevel(logging.INFO)
    say(f"serve: listening on http://{cfg.host}:{cfg.port}/v1" + (" (API key required)" if cfg.api_key else ""))
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        engine.shutdown()
    return 0

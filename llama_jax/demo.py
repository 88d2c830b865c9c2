"""`llama-jax demo`.

For now (the end-to-end pipeline lands with the demo issue) the demo initialises a toy Llama,
exports it as an HF directory, loads it back and generates from it with the KV-cache decoder:
it shows the machinery end to end, and the text is random because the model is untrained.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def run_demo(args) -> int:
    import llama_jax
    from .cli import default_data_dir
    from .text import load_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else default_data_dir()
    tok_path = Path(args.base_tokenizer) if args.base_tokenizer else data / "llama2-tokenizer" / "tokenizer.model"
    if not tok_path.exists():
        raise FileNotFoundError(f"{tok_path}: base tokenizer not found (pass --base-tokenizer or --data)")
    tok = load_tokenizer(tok_path)
    cfg = llama_jax.preset("toy", vocab_size=len(tok))
    t0 = time.perf_counter()
    model = llama_jax.init_model(cfg, seed=0)
    export = llama_jax.save_hf(model, out / "toy-model", tokenizer=None)
    model = llama_jax.load(export)
    print(f"toy Llama: {cfg.num_params() / 1e6:.2f}M parameters, exported to {export} and reloaded")
    prompt = "人工智能是"
    print(f"prompt: {prompt}\ncontinuation (untrained model, random text): ", end="", flush=True)
    text = llama_jax.generate(model, prompt, tok, max_new_tokens=24, temperature=0.0, stream=True)
    report = {"stage": "foundation-only demo", "params": cfg.num_params(), "prompt": prompt,
              "continuation": text[0], "seconds": round(time.perf_counter() - t0, 2)}
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    print(f"report: {out / 'report.json'}")
    return 0

"""`llama-jax export`: a run directory or checkpoint -> an HF directory (merged) or a PEFT adapter."""
from __future__ import annotations

import json
from pathlib import Path

from .config import PRESETS
from .train.config import resolve_path


def export(src: str | Path, out: str | Path, peft: bool = False, step: int | None = None) -> Path:
    import llama_jax

    from .data.templates import TEMPLATE_FILE, recorded_template, template_record

    src = Path(src)
    run_cfg = src / "config.json"
    if (src / "checkpoints").is_dir() and run_cfg.exists():
        cfg = json.loads(run_cfg.read_text())
        model, tok = _model_from_run(cfg, src, step)
        # the chat template the run trained with (SFT / DPO / RM / PPO data.template), for serve / chat
        template = (cfg.get("data") or {}).get("template")
    else:  # an HF dir or a llama_jax checkpoint: a format conversion
        if peft:
            raise ValueError(f"{src}: --peft needs a LoRA training run directory")
        model, tok = llama_jax.load(src), (src if _has_tokenizer(src) else None)
        template = recorded_template(src) if src.is_dir() else None
    extra = {TEMPLATE_FILE: template_record(template).encode()} if template else None
    from . import lora

    if peft:
        if not lora.has_lora(model):
            raise ValueError(f"{src}: this run did not train LoRA (lora.enabled is false); export without --peft")
        init = cfg["model"]["init"]
        if init in PRESETS:
            # The base was a random init (from train.seed): it exists nowhere a loader could find it
            # by name, so it is rebuilt (the same seed gives the same weights) and saved inside the
            # adapter directory, which names it by absolute path.
            base = _base_of_run(cfg, model)
            return lora.save_peft(model, out, base_model=base, base_tokenizer=tok, extra_files=extra)
        return lora.save_peft(model, out, base_model_name_or_path=str(Path(resolve_path(cfg, init)).absolute()),
                              extra_files=extra)
    if lora.has_lora(model):
        model = lora.merge(model)
    return llama_jax.save_hf(model, out, tokenizer=tok, extra_files=extra)


def _base_of_run(cfg: dict, model):
    """The run's initial (pre-training, LoRA-free) model of a preset base, rebuilt from the config."""
    from .stages.common import build_model

    return build_model(cfg, None, vocab_size=model.config.vocab_size, head=model.head)


def _has_tokenizer(d: Path) -> bool:
    return any((d / n).exists() for n in ("tokenizer.model", "tokenizer.json"))


def _model_from_run(cfg: dict, run_dir: Path, step):
    from .stages.common import build_model
    from .stages.lora_setup import maybe_apply_lora
    from .train.loop import restore_latest

    head = "score" if cfg.get("_head") == "score" else "lm"
    tok_path = resolve_path(cfg, cfg.get("tokenizer")) or resolve_path(cfg, cfg["model"]["init"])
    vocab = None
    if tok_path and Path(tok_path).exists():
        from .text import load_tokenizer

        vocab = len(load_tokenizer(tok_path))
    model = build_model(cfg, None, vocab_size=vocab, head=head)
    trainable = maybe_apply_lora(cfg, model)
    restore_latest(model, cfg, run_dir, trainable, step)
    return model, tok_path

"""`llama-jax export`: a run directory or checkpoint -> an HF directory (merged) or a PEFT adapter."""
from __future__ import annotations

from pathlib import Path

from . import lora
from .config import PRESETS
from .data.templates import TEMPLATE_FILE, recorded_template, template_record
from .hf import load, save_hf
from .text import load_tokenizer
from .train.config import RunConfig, from_run_dict
from .train.run import RunDir, build_model, restore_params, tokenizer_path, trainable_filter


def export(src: str | Path, out: str | Path, peft: bool = False, step: int | None = None) -> Path:
    src = Path(src)
    if RunDir.is_run(src):
        raw, run = RunDir.read(src)
        # the common sections (model, tokenizer, lora, train, mesh) of any stage's run
        cfg = from_run_dict(RunConfig, raw, sections=True)
        model, tok = _model_from_run(cfg, run.get("head", "lm"), src, step)
        # the chat template the run trained with (SFT / DPO / RM / PPO data.template), for serve / chat
        template = (raw.get("data") or {}).get("template")
    else:  # an HF dir or a llama_jax checkpoint: a format conversion
        if peft:
            raise ValueError(f"{src}: --peft needs a LoRA training run directory")
        model, tok = load(src), (src if _has_tokenizer(src) else None)
        template = recorded_template(src) if src.is_dir() else None
    extra = {TEMPLATE_FILE: template_record(template).encode()} if template else None

    if peft:
        if not lora.has_lora(model):
            raise ValueError(f"{src}: this run did not train LoRA (lora.enabled is false); export without --peft")
        init = cfg.model.init
        if init in PRESETS:
            # The base was a random init (from train.seed): it exists nowhere a loader could find it
            # by name, so it is rebuilt (the same seed gives the same weights) and saved inside the
            # adapter directory, which names it by absolute path.
            base = _base_of_run(cfg, model)
            return lora.save_peft(model, out, base_model=base, base_tokenizer=tok, extra_files=extra)
        return lora.save_peft(model, out, base_model_name_or_path=str(Path(cfg.path(init)).absolute()),
                              extra_files=extra)
    if lora.has_lora(model):
        model = lora.merge(model)
    return save_hf(model, out, tokenizer=tok, extra_files=extra)


def _base_of_run(cfg: RunConfig, model):
    """The run's initial (pre-training, LoRA-free) model of a preset base, rebuilt from the config."""
    return build_model(cfg, None, vocab_size=model.config.vocab_size, head=model.head)


def _has_tokenizer(d: Path) -> bool:
    return any((d / n).exists() for n in ("tokenizer.model", "tokenizer.json"))


def _model_from_run(cfg: RunConfig, head: str, run_dir: Path, step):
    tok_path = tokenizer_path(cfg)
    vocab = len(load_tokenizer(tok_path)) if tok_path and Path(tok_path).exists() else None
    model = build_model(cfg, None, vocab_size=vocab, head=head)
    restore_params(model, cfg, run_dir, trainable_filter(cfg, model), step)
    return model, tok_path

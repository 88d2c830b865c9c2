"""Run configs: YAML files merged over per-stage defaults, with `dotted.key=value` overrides.

Unknown keys are errors (a typo must not silently fall back to a default).  The keys
train.steps / log_every / eval_every / checkpoint_every / seed exist in every stage."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

COMMON: dict[str, Any] = {
    "model": {
        "init": "toy",            # preset name, HF dir or llama_jax checkpoint
        "overrides": {},          # LlamaConfig fields for presets (e.g. vocab_size)
        "dtype": "float32",       # compute dtype (bfloat16 on accelerators)
        "param_dtype": "float32",  # master weights
        "remat": "none",
        "scan_layers": True,
        "attention_impl": None,   # xla | cudnn | splash | auto (llama_jax.attention)
        "frozen_dtype": None,     # LoRA: the frozen base's dtype (None = the compute dtype)
        "quantization": None,     # LoRA: int8 | int4 | nf4 frozen base (QLoRA, llama_jax.quant)
        "quant_tile": 64,         # int4 / nf4: input rows per scale
    },
    "tokenizer": None,            # tokenizer dir / tokenizer.model (default: the model dir)
    "lora": {
        "enabled": False, "rank": 8, "alpha": 16, "dropout": 0.0,
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "trainable_modules": [],
    },
    "train": {
        "steps": 100, "batch_size": 8, "grad_accum": 1,
        "lr": 3e-4, "lora_lr": None, "schedule": "cosine", "warmup_ratio": 0.05, "warmup_steps": None,
        "min_lr_ratio": 0.1, "weight_decay": 0.01, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": 1.0,
        "log_every": 10, "eval_every": 50, "eval_batches": 8, "checkpoint_every": 50, "keep_checkpoints": 2,
        "seed": 0, "max_nonfinite": 5, "peak_flops": None, "tensorboard": False, "progress": True,
    },
    "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
}


class ConfigError(ValueError):
    pass


# mappings whose keys are not ours to check (LlamaConfig fields, a reward or check factory's
# arguments, the names of data.eval_sets)
FREE_FORM = {"overrides", "reward_fn_args", "check_fn_args", "eval_sets"}


def _merge(base: dict, over: dict, where: str, source: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        key = f"{where}{k}"
        if k not in out:
            raise ConfigError(f"{source}: unknown key '{key}' (known: {', '.join(sorted(out))})")
        if isinstance(out[k], dict) and k in FREE_FORM:
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: '{key}' must be a mapping")
            out[k] = copy.deepcopy(v)  # replaced as a whole, as given
        elif isinstance(out[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: '{key}' must be a mapping")
            out[k] = _merge(out[k], v, key + ".", source)
        else:
            out[k] = v
    return out


def _parse_value(s: str):
    try:
        return yaml.safe_load(s)
    except yaml.YAMLError:
        return s


def load_config(defaults: dict, path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    cfg = copy.deepcopy(defaults)
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        cfg = _merge(cfg, data, "", str(path))
        cfg["_config_dir"] = str(path.parent.resolve())
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r}: expected dotted.key=value")
        key, val = o.split("=", 1)
        parts = key.split(".")
        nested: dict = {}
        cur = nested
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = _parse_value(val)
        cfg = _merge(cfg, nested, "", f"override {key}")
    return cfg


def stage_defaults(**sections) -> dict:
    d = copy.deepcopy(COMMON)
    for k, v in sections.items():
        d[k] = _merge(d[k], v, k + ".", "defaults") if k in d and isinstance(d[k], dict) else v
    return d


def resolve_path(cfg: dict, p: str | None) -> str | None:
    """Relative paths in a config: '$DATA/...' is the shared data dir; others are taken as given."""
    if p is None:
        return None
    from ..tokenizer.corpus import default_data_dir

    if p.startswith("$DATA"):
        return str(default_data_dir()) + p[len("$DATA"):]
    return p


def dump(cfg: dict) -> str:
    return json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, indent=2, ensure_ascii=False)

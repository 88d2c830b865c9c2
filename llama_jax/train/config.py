"""Typed run configs: a dataclass per section, loaded from YAML + `dotted.key=value` overrides.

A stage's config is a `RunConfig` subclass (`stages.sft.SFTConfig`, ...) whose fields are sections
(`ModelSection`, `LoraSection`, `TrainSection`, `MeshSection` and the stage's own `data` / `dpo` /
`ppo` / ...).  Every option is a field with a default, a type and a one-line doc (`opt(...)`), so
`llama-jax <stage> CONFIG --print-config` shows what a stage accepts and what it resolved to.

Loading (`load_config(SFTConfig, path, overrides)`): the defaults, then the YAML file, then each
override, merged key by key.  An unknown key is an error naming it (a typo must not silently fall
back to a default), and so is a value of the wrong type ("train.steps: expected int, got 'ten'")
or outside a field's choices.  Free-form mappings (`dict` fields: LlamaConfig overrides, a reward
factory's arguments, data.eval_sets) are replaced as a whole.  Numbers written like `1e-5` (a
string to YAML 1.1) are accepted for float fields; a string is accepted for a `list[str]` field
as a one-element list.

`cfg.to_dict()` is what a run directory's config.json holds: loading it back with the same class
gives the same config.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from ..config import ATTENTION_IMPLS, CACHE_LAYERS, REMAT_POLICIES
from ..tokenizer.corpus import default_data_dir


class ConfigError(ValueError):
    pass


def opt(default, doc: str, choices: tuple | None = None):
    """A config field: its default (copied per instance when mutable), a one-line doc and, for
    enumerations, the allowed values."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- typed conversion
def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _union_args(tp):
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _convert(value, tp, key: str):
    """`value` as type `tp` (a resolved annotation), or ConfigError naming `key`."""
    def bad(expected=None):
        return ConfigError(f"{key}: expected {expected or _type_name(tp)}, got {value!r}")

    args = _union_args(tp)
    if args is not None:
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        for t in (a for a in args if a is not type(None)):
            try:
                return _convert(value, t, key)
            except ConfigError:
                continue
        raise bad()
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return tp.from_dict(value, key + ".")
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return copy.deepcopy(value)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str) and item is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{key}: unsupported config type {tp!r}")  # a programming error, not a user's


@dataclass
class Section:
    """Base of every config section (and of RunConfig): typed construction from a mapping."""

    @classmethod
    def hints(cls) -> dict:
        return typing.get_type_hints(cls)

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        """The user-settable fields (not the internal ones, e.g. RunConfig.config_dir)."""
        return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]

    @classmethod
    def from_dict(cls, d: dict, where: str = ""):
        """A typed, checked instance; missing keys take their defaults."""
        hints = cls.hints()
        names = {f.name for f in cls.options()}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown key '{where}{unknown[0]}' (known: {', '.join(sorted(names))})")
        kw = {}
        defaults = None
        for f in cls.options():
            if f.name not in d:
                continue
            given, tp = d[f.name], hints[f.name]
            if dataclasses.is_dataclass(tp) and isinstance(given, dict):
                # a nested section starts from this class's default for it (a stage may change a
                # section's defaults, e.g. the RL stages' train section), not from the section class's
                defaults = defaults or cls()
                given = {**getattr(defaults, f.name).to_dict(), **given}
            v = _convert(given, tp, where + f.name)
            choices = f.metadata.get("choices")
            if choices is not None and v not in choices:
                raise ConfigError(f"{where}{f.name}: {v!r} is not one of {', '.join(map(str, choices))}")
            kw[f.name] = v
        out = cls(**kw)
        for f in cls.options():  # sections left at their defaults are checked too (e.g. ppo: needs a reward)
            v = getattr(out, f.name)
            if f.name not in d and isinstance(v, Section):
                v.check(where + f.name + ".")
        out.check(where)
        return out

    def check(self, where: str = "") -> None:
        """Cross-field checks of a section (ConfigError naming the key); none by default."""

    def to_dict(self) -> dict:
        out = {}
        for f in self.options():
            v = getattr(self, f.name)
            if isinstance(v, Section):
                v = v.to_dict()
            elif isinstance(v, list):
                v = [x.to_dict() if isinstance(x, Section) else copy.deepcopy(x) for x in v]
            out[f.name] = copy.deepcopy(v) if isinstance(v, dict) else v
        return out

    def replace(self, **changes):
        """A copy with `changes` (dataclasses.replace; sections are immutable by convention)."""
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------- the shared sections
DTYPES = ("float32", "bfloat16", "float16")
ON_ERROR = ("skip", "error")  # a bad data record: skipped (counted, reported) or a DataError naming it


@dataclass
class ModelSection(Section):
    init: str = opt("toy", "preset name (toy, tiny, llama2-7b, ...), HF directory or llama_jax checkpoint")
    overrides: dict = opt({}, "LlamaConfig fields for a preset (e.g. vocab_size, pad_token_id)")
    dtype: str = opt("float32", "compute dtype (bfloat16 on accelerators)", DTYPES)
    param_dtype: str = opt("float32", "dtype of the master weights", DTYPES)
    remat: str = opt("none", "activation checkpointing of each layer", REMAT_POLICIES)
    scan_layers: bool = opt(True, "lax.scan over the layers (one compiled layer)")
    attention_impl: str | None = opt(None, "attention kernel (llama_jax.attention); null = the model's default",
                                     (None,) + ATTENTION_IMPLS)
    cache_layers: str = opt("auto", "inference with a KV cache: scan the layers (stacked cache) or unroll "
                            "them (a buffer per layer); auto = unroll on CPU, scan on accelerators", CACHE_LAYERS)
    frozen_dtype: str | None = opt(None, "LoRA: the frozen base's dtype (null = the compute dtype)", (None,) + DTYPES)
    quantization: str | None = opt(None, "LoRA: a quantized frozen base (QLoRA, llama_jax.quant)",
                                   (None, "int8", "int4", "nf4"))
    quant_tile: int = opt(64, "int4 / nf4: input rows per scale")

    def runtime(self) -> dict:
        """The LlamaConfig runtime options this section sets (train.run.build_model, the planner)."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, scan_layers=self.scan_layers,
                    attention_impl=self.attention_impl, cache_layers=self.cache_layers)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSection(Section):
    enabled: bool = opt(False, "train LoRA adapters instead of the full model")
    rank: int = opt(8, "adapter rank r")
    alpha: float = opt(16.0, "scale alpha (the update is alpha / r x B A)")
    dropout: float = opt(0.0, "dropout on the adapter's input")
    targets: list[str] = opt(LORA_TARGETS, "Linear modules that get adapters")
    trainable_modules: list[str] = opt([], "modules trained in full beside the adapters (embed_tokens, lm_head, score)")


@dataclass
class TrainSection(Section):
    steps: int | None = opt(100, "optimizer steps (reward model: null = data.epochs over the pairs)")
    batch_size: int = opt(8, "global batch in rows (PPO / GRPO: rollouts / prompts per step)")
    grad_accum: int = opt(1, "micro-batches per step (batch_size / grad_accum rows each)")
    lr: float = opt(3e-4, "peak learning rate")
    lora_lr: float | None = opt(None, "learning rate of the LoRA factors (null = lr)")
    schedule: str = opt("cosine", "decay after warmup", ("cosine", "linear", "constant"))
    warmup_ratio: float = opt(0.05, "warmup steps as a fraction of steps")
    warmup_steps: int | None = opt(None, "warmup steps (overrides warmup_ratio)")
    min_lr_ratio: float = opt(0.1, "final learning rate / peak")
    weight_decay: float = opt(0.01, "AdamW weight decay (matrices only, not norms)")
    b1: float = opt(0.9, "Adam beta1")
    b2: float = opt(0.95, "Adam beta2")
    eps: float = opt(1e-8, "Adam epsilon")
    clip_norm: float | None = opt(1.0, "gradient global-norm clip (null or 0 = none)")
    log_every: int = opt(10, "steps between metrics.jsonl records")
    eval_every: int = opt(50, "steps between evals (0 = never)")
    eval_batches: int | None = opt(8, "held-out global batches per eval (null = all)")
    checkpoint_every: int = opt(50, "steps between checkpoints (the last step always saves)")
    keep_checkpoints: int = opt(2, "checkpoints kept")
    seed: int = opt(0, "seed of the data order, initialisation and dropout")
    max_nonfinite: int = opt(5, "non-finite steps in a row before the run stops")
    peak_flops: float | None = opt(None, "peak FLOP/s per chip for MFU (null = known chips)")
    tensorboard: bool = opt(False, "also write TensorBoard events")
    progress: bool = opt(True, "progress bar")

    def check(self, where: str = "") -> None:
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}{name}: {getattr(self, name)} (must be >= 1)")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"{where}steps: {self.steps} (must be >= 1)")


@dataclass
class MeshSection(Section):
    data: int = opt(1, "data-parallel axis (-1 = all remaining devices)")
    fsdp: int = opt(-1, "fully sharded data-parallel axis (-1 = all remaining devices)")
    tensor: int = opt(1, "tensor-parallel axis")


@dataclass
class RunConfig(Section):
    """What every stage has; a stage adds its sections (and may change defaults) in a subclass."""
    model: ModelSection = field(default_factory=ModelSection, metadata={"doc": "the model to start from"})
    tokenizer: str | None = opt(None, "tokenizer dir / tokenizer.model (null = the model dir)")
    lora: LoraSection = field(default_factory=LoraSection, metadata={"doc": "LoRA / QLoRA"})
    train: TrainSection = field(default_factory=TrainSection, metadata={"doc": "optimizer, schedule, logging"})
    mesh: MeshSection = field(default_factory=MeshSection, metadata={"doc": "device mesh"})
    # the directory of the YAML file (names the default run directory); not an option
    config_dir: str | None = field(default=None, repr=False, compare=False, metadata={"internal": True})
    steps_required: typing.ClassVar[bool] = True  # False: the stage derives train.steps (reward model)

    def check(self, where: str = "") -> None:
        if self.steps_required and self.train.steps is None:
            raise ConfigError("train.steps: required (a number of steps)")
        if self.model.quantization and not self.lora.enabled:
            raise ConfigError(f"model.quantization={self.model.quantization!r} needs lora.enabled: a quantized base "
                              "is frozen (QLoRA); full fine-tuning trains float weights")

    def with_model(self, init: str, **changes):
        """The config with model.init (and other model fields) replaced: to build a reward / value
        model from the same runtime options."""
        return self.replace(model=self.model.replace(init=init, **changes))

    def path(self, p: str | None) -> str | None:
        """A path from the config: '$DATA/...' is the shared data dir; others are taken as given."""
        if p is None:
            return None
        if p.startswith("$DATA"):
            return str(default_data_dir()) + p[len("$DATA"):]
        return p

    def paths(self, ps) -> list[str]:
        return [self.path(p) for p in ps]

    def default_run_dir(self, stage: str) -> Path:
        """runs/<the config file's directory name>-<stage>, absolute."""
        return Path(f"runs/{Path(self.config_dir or '.').name}-{stage}").absolute()


def _merge(cls, base: dict, over: dict, where: str, source: str) -> dict:
    """`over` merged into `base` (both plain mappings of `cls`'s fields), checking the keys."""
    if not isinstance(over, dict):
        raise ConfigError(f"{source}: '{where.rstrip('.') or 'config'}' must be a mapping")
    hints = cls.hints()
    names = {f.name for f in cls.options()}
    out = dict(base)
    for k, v in over.items():
        key = f"{where}{k}"
        if k not in names:
            raise ConfigError(f"{source}: unknown key '{key}' (known: {', '.join(sorted(names))})")
        tp = hints[k]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: '{key}' must be a mapping")
            out[k] = _merge(tp, out.get(k) or {}, v, key + ".", source)
        else:
            out[k] = v
    return out


def _parse_value(s: str):
    try:
        return yaml.safe_load(s)
    except yaml.YAMLError:
        return s


def load_config(cls: type[RunConfig], path: str | Path | None = None, overrides=()) -> RunConfig:
    """cls's defaults, then the YAML file at `path`, then each `dotted.key=value` override."""
    merged: dict = {}
    config_dir = None
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        merged = _merge(cls, merged, data, "", str(path))
        config_dir = str(path.parent.resolve())
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
        merged = _merge(cls, merged, nested, "", f"override {key}")
    try:
        cfg = cls.from_dict(merged)
    except ConfigError as e:
        where = [str(path)] if path is not None else []
        where += ["the overrides"] if overrides else []
        raise ConfigError(f"{e} (in {' or '.join(where)})" if where else str(e)) from None
    cfg.config_dir = config_dir
    return cfg


def from_run_dict(cls: type[RunConfig], d: dict, sections: bool = False) -> RunConfig:
    """A run directory's config.json as `cls`.  sections=True keeps only the keys `cls` knows (to
    read the common sections of any stage's run, e.g. for export)."""
    if sections:
        names = {f.name for f in cls.options()}
        d = {k: v for k, v in d.items() if k in names}
    return cls.from_dict(d)


# ----------------------------------------------------------------------------- --print-config
def format_config(cfg: Section, indent: int = 0) -> str:
    """The resolved config as YAML, each option followed by its doc (and choices) as a comment."""
    lines = []
    pad = "  " * indent
    for f in cfg.options():
        v = getattr(cfg, f.name)
        doc = f.metadata.get("doc", "")
        if isinstance(v, Section):
            lines.append(f"{pad}{f.name}:" + (f"  # {doc}" if doc else ""))
            lines.append(format_config(v, indent + 1))
            continue
        if isinstance(v, list):
            v = [x.to_dict() if isinstance(x, Section) else x for x in v]
        text = json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else \
            yaml.safe_dump(v, default_flow_style=True, allow_unicode=True).strip().removesuffix("...").strip()
        choices = f.metadata.get("choices")
        note = doc + (f" [{' | '.join('null' if c is None else str(c) for c in choices)}]" if choices else "")
        lines.append(f"{pad}{f.name}: {text}" + (f"  # {note}" if note else ""))
    return "\n".join(lines)


def dump(cfg: Section) -> str:
    return json.dumps(cfg.to_dict(), indent=2, ensure_ascii=False)

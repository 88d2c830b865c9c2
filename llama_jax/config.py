"""LlamaConfig: the HF `config.json` fields we support, plus runtime options.

Reading is strict: a field whose value would change the math in a way this model does not
implement raises `UnsupportedConfigError` naming that field, so a checkpoint is never
silently mis-converted.  Both rope layouts are read: the classic one of the Llama-2
checkpoints (`rope_theta` + `rope_scaling`) and the `rope_parameters` one transformers 5
writes.  We write the classic layout, which transformers 4.x and 5.x both read.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

ROPE_TYPES = ("default", "linear", "dynamic")
REMAT_POLICIES = ("none", "full", "save_dots", "save_qkv_proj")
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "auto")  # llama_jax.attention.IMPLS
CACHE_LAYERS = ("auto", "scan", "unroll")  # model.Cache: stacked + scanned, or a buffer per layer


class UnsupportedConfigError(ValueError):
    """A config.json field whose value this implementation cannot honour."""


@dataclass
class LlamaConfig:
    # --- HF config.json fields ---
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear"|"dynamic", "factor": f}
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # --- runtime options (never written to config.json) ---
    dtype: str = "float32"          # compute dtype
    param_dtype: str = "float32"    # storage dtype of parameters
    scan_layers: bool = True        # lax.scan over stacked layers; False = unrolled loop
    remat: str = "none"             # one of REMAT_POLICIES
    attention_impl: str | None = None  # None = "xla"; "cudnn", "splash" or "auto" (llama_jax.attention)
    cache_layers: str = "auto"      # with a KV cache: "scan" | "unroll" | "auto" (unroll on CPU; model.Cache)
    extra: dict = field(default_factory=dict, repr=False)  # unknown-but-harmless HF keys, kept for export

    RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention_impl", "cache_layers", "extra")

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise UnsupportedConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads} and no head_dim is given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.rope_scaling is not None:
            self.rope_scaling = _normalise_rope_scaling(self.rope_scaling, "rope_scaling")
        if self.attention_impl not in (None,) + ATTENTION_IMPLS:
            raise UnsupportedConfigError(f"attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLS}")
        if self.cache_layers not in CACHE_LAYERS:
            raise UnsupportedConfigError(f"cache_layers={self.cache_layers!r}: expected one of {CACHE_LAYERS}")
        if self.remat not in REMAT_POLICIES:
            raise UnsupportedConfigError(f"remat={self.remat!r}: expected one of {REMAT_POLICIES}")

    def __hash__(self):  # the config is static data in jitted functions' graphdefs
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    # ------------------------------------------------------------------ derived
    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else (self.eos_token_id,)

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self, include_embeddings: bool = True) -> int:
        d, f, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        nq, nk, h = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        per_layer = d * nq * h * 2 + d * nk * h * 2 + 3 * d * f + 2 * d
        n = L * per_layer + d
        if include_embeddings:
            n += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        elif not self.tie_word_embeddings:
            n += self.vocab_size * d  # lm_head is a matmul, count it
        return n

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json", **runtime) -> "LlamaConfig":
        def bad(fieldname, msg):
            raise UnsupportedConfigError(f"{source}: field '{fieldname}': {msg}")

        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type != "llama":
            bad("model_type", f"{model_type!r} is not supported (only 'llama')")
        for a in archs:
            if a not in ("LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaModel"):
                bad("architectures", f"{a!r} is not a Llama architecture this loader understands")
        if d.get("hidden_act", "silu") != "silu":
            bad("hidden_act", f"{d['hidden_act']!r} is not supported (only 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag, False):
                bad(flag, "biases are not supported (Llama-2 has none)")
        if d.get("sliding_window") not in (None, 0):
            bad("sliding_window", "sliding-window attention is not supported")
        if d.get("quantization_config"):
            bad("quantization_config", "quantized checkpoints are not supported; use a full-precision one")

        rope_theta, rope_scaling = _read_rope(d, bad)
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in cls.RUNTIME_FIELDS or f.name in ("rope_theta", "rope_scaling"):
                continue
            if f.name in d and d[f.name] is not None:
                kw[f.name] = d[f.name]
        for req in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if req not in kw:
                bad(req, "missing")
        known = {f.name for f in dataclasses.fields(cls)} | {"rope_parameters", "model_type", "architectures"}
        extra = {k: v for k, v in d.items() if k not in known and k in _HARMLESS_KEYS}
        try:
            return cls(rope_theta=rope_theta, rope_scaling=rope_scaling, extra=extra, **kw, **runtime)
        except UnsupportedConfigError as e:
            raise UnsupportedConfigError(f"{source}: {e}") from None

    def to_hf_dict(self, architecture: str = "LlamaForCausalLM") -> dict:
        d = {
            "architectures": [architecture],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": self.param_dtype,
        }
        for f in dataclasses.fields(self):
            if f.name not in self.RUNTIME_FIELDS:
                d[f.name] = getattr(self, f.name)
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"type": self.rope_type, "rope_type": self.rope_type,
                                 "factor": self.rope_scaling["factor"]}
        d.update({k: v for k, v in self.extra.items() if k not in d})
        return d

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **runtime) -> "LlamaConfig":
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise UnsupportedConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path), **runtime)

    def to_json_string(self, **kw) -> str:
        return json.dumps(self.to_hf_dict(**kw), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# Keys of HF configs that carry no meaning for the math (kept on export so round trips are clean).
_HARMLESS_KEYS = {"pretraining_tp", "use_cache", "transformers_version", "attention_dropout",
                  "id2label", "label2id", "num_labels", "problem_type", "_name_or_path", "dtype"}


def _normalise_rope_scaling(rs: dict, fieldname: str) -> dict | None:
    if not isinstance(rs, dict):
        raise UnsupportedConfigError(f"field '{fieldname}': expected a mapping, got {rs!r}")
    rtype = rs.get("rope_type", rs.get("type", "default"))
    if rtype not in ROPE_TYPES:
        raise UnsupportedConfigError(
            f"field '{fieldname}.rope_type': {rtype!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if rtype == "default":
        return None
    factor = rs.get("factor")
    if not isinstance(factor, (int, float)) or factor < 1.0:
        raise UnsupportedConfigError(f"field '{fieldname}.factor': expected a number >= 1, got {factor!r}")
    return {"rope_type": rtype, "factor": float(factor)}


def _read_rope(d: dict, bad) -> tuple[float, dict | None]:
    """Both layouts: classic (rope_theta, rope_scaling) and transformers-5 (rope_parameters)."""
    rp = d.get("rope_parameters")
    if rp:
        if not isinstance(rp, dict) or "rope_theta" not in rp and any(isinstance(v, dict) for v in rp.values()):
            bad("rope_parameters", "per-layer-type rope parameters are not supported")
        theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
        try:
            return theta, _normalise_rope_scaling(rp, "rope_parameters")
        except UnsupportedConfigError as e:
            bad("rope_parameters", str(e))
    theta = float(d.get("rope_theta", 10000.0) or 10000.0)
    rs = d.get("rope_scaling")
    if rs is None:
        return theta, None
    try:
        return theta, _normalise_rope_scaling(rs, "rope_scaling")
    except UnsupportedConfigError as e:
        bad("rope_scaling", str(e))


PRESETS: dict[str, dict] = {
    # Tiny model for CPU tests and the demo.
    "toy": dict(vocab_size=32000, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    # The foundation benchmark config (hidden 512, 8 layers).
    "bench-cpu": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, max_position_embeddings=2048),
    # Llama-2-shaped ~1B model for the GPU MFU benchmark.
    "llama2-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=22,
                      num_attention_heads=16, max_position_embeddings=4096),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, max_position_embeddings=4096),
    "llama2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, max_position_embeddings=4096),
    "llama2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096),
}


def preset(name: str, **overrides) -> LlamaConfig:
    if name not in PRESETS:
        raise UnsupportedConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})

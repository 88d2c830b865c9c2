"""LoRA as a transform over a model (factors live on `Linear.lora`).

`apply` attaches a `LoRA` module to each targeted `Linear`; the forward is
x @ W + scale * dropout(x) @ A @ B, so W + A@B is never formed and, since only the trainable
state is differentiated, neither is a gradient of a frozen matrix.  Factors inside the stacked
block carry the leading [num_layers] axis and the 'layers' logical axis like every other stacked
parameter, so the scanned forward slices them per layer.

Training:
    graphdef, trainable, frozen, rest = lora.split_trainable(model)
    # differentiate and optimise `trainable` only; rebuild with nnx.merge(graphdef, trainable, frozen, rest)
Dropout (rate > 0) is on by default: `model.eval()` (or `nnx.view(model, deterministic=True)`)
turns it off for evaluation, `model.train()` back on.  Llama runs its stacked layers under
`lax.scan` on a split copy, so RNG counter updates made inside a layer never reach the model: call
`lora.advance_dropout(model)` once per step for fresh masks (in a functional step: merge, advance,
and hand `nnx.state(m, nnx.RngState)` back as the new `rest`).

Export: `merge` folds the factors into the kernels (then `llama_jax.save_hf` works) and
`save_peft` / `load_peft` read and write PEFT adapter directories.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from .fsutil import atomic_output_dir
from .hf import base_params, hf_names, save_hf
from .model import Linear, has_lora  # noqa: F401  (has_lora: public here too)
from .quant import dequantize_model, kernel_shape, quantize_model
from .safetensors_io import SafetensorsFile, write_file
from .sharding import named_sharding, to_host

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_BASE_DIR = "base"  # save_peft(base_model=...): the base model, inside the adapter directory
_PEFT_PREFIX = "base_model.model."  # PeftModel wraps the HF model twice (PeftModel -> LoraModel)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The LoRA settings a model was transformed with (hashable: it is static graph metadata)."""
    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    trainable_modules: tuple[str, ...] = ()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRA(nnx.Module):
    """delta(x) = scale * dropout(x) @ a @ b with a: [..., in, r], b: [..., r, out]."""

    def __init__(self, a, b, a_axes, b_axes, scale: float, dropout: float, dropout_keys=None):
        self.a = nnx.LoRAParam(a, axes=a_axes)
        self.b = nnx.LoRAParam(b, axes=b_axes)
        self.scale = scale
        self.dropout = nnx.Dropout(dropout)
        if dropout > 0:
            self.dropout.rngs = nnx.RngStream(dropout_keys, tag="dropout")

    def __call__(self, x):
        h = self.dropout(x)
        return (h @ self.a[...].astype(x.dtype)) @ self.b[...].astype(x.dtype) * self.scale


# ----------------------------------------------------------------------------- transform
def _linears(model):
    return [(tuple(str(p) for p in path), m) for path, m in nnx.iter_modules(model) if isinstance(m, Linear)]


def lora_config(model) -> LoraConfig:
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("model has no LoRA attached (use llama_jax.lora.apply or load_peft)")
    return cfg


def _modules_of(hf_param: str) -> list[str]:
    """'model.layers.0.mlp.up_proj.weight' -> every enclosing module name, outermost first."""
    parts = hf_param.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _select(model, targets, modules) -> tuple[list, set]:
    """(Linears that get LoRA, param paths trained in full), chosen by PEFT's rules on HF names so
    that the adapter means the same in PEFT: target t matches module m when m == t or m ends with
    '.t'; a module to save s matches every parameter inside a module whose name ends with s (plain
    string suffix, as PEFT's modules_to_save does: 'norm' also hits 'input_layernorm').  Stacked
    layers are all-or-none, so a name selecting only some layers is refused."""
    cfg, used = model.config, set()

    def is_target(hf_param, t):
        m = hf_param[: -len(".weight")]
        return m == t or m.endswith("." + t)

    def is_saved(hf_param, s):
        return any(m.endswith(s) for m in _modules_of(hf_param))

    def pick(path, hf_params, names, rule):
        hits = []
        for n in hf_params:  # one per stacked layer
            h = [x for x in names if rule(n, x)]
            used.update(h)
            hits.append(bool(h))
        if any(hits) and not all(hits):
            raise ValueError(f"{'.'.join(path)}: the names select only some of its stacked layers "
                             "(layers are all-or-none here)")
        return all(hits)

    linears = [(p, m) for p, m in _linears(model) if pick(p, hf_names(p + ("kernel",), cfg), targets, is_target)]
    full = {p for p, _ in base_params(model) if pick(p, hf_names(p, cfg), modules, is_saved)}
    for kind, names in (("LoRA targets", targets), ("trainable modules", modules)):
        unused = [n for n in names if n not in used]
        if unused:
            hint = (" (tied embeddings: the output projection is embed_tokens)"
                    if "lm_head" in unused and cfg.tie_word_embeddings else "")
            raise ValueError(f"{kind} {unused} match nothing in the model{hint}")
    both = sorted(".".join(p) for p, _ in linears if p + ("kernel",) in full)
    if both:
        raise ValueError(f"{both}: a module is either a LoRA target or trained in full, not both")
    return linears, full


def _init_factors(seed, specs, rank, with_dropout, abstract=False):
    """(a, b, dropout keys | None) per (path, kernel shape).  A is drawn on the host with numpy:
    the factors are small, every host gets the same values, and nothing has to be compiled.
    abstract: a and b are ShapeDtypeStructs (an abstract model, e.g. for the memory planner)."""
    out = []
    for path, shape in specs:
        lead, (din, dout) = shape[:-2], shape[-2:]
        # Seeded by the module path: adding or removing other targets leaves this one's init alone.
        tag = zlib.crc32(path.encode())
        bound = 1.0 / math.sqrt(din)  # PEFT: kaiming_uniform_(a=sqrt(5)) on A [r, in] = U(+-1/sqrt(in))
        if abstract:
            a = jax.ShapeDtypeStruct(lead + (din, rank), np.float32)
            b = jax.ShapeDtypeStruct(lead + (rank, dout), np.float32)
        else:
            a = np.random.default_rng([seed, tag]).uniform(-bound, bound, lead + (din, rank)).astype(np.float32)
            b = np.zeros(lead + (rank, dout), np.float32)
        keys = None
        if with_dropout:  # one key per stacked layer, so layers do not share masks
            k = jax.random.fold_in(jax.random.key(seed), tag)
            keys = jax.random.split(k, lead) if lead else k
        out.append((a, b, keys))
    return out


def apply(model, *, rank: int, alpha: float, targets=ALL_TARGETS, dropout: float = 0.0,
          trainable_modules=(), seed: int = 0):
    """Attach LoRA factors to every `Linear` named in `targets` (in place; returns the model).

    Factors are float32 (as PEFT keeps adapters) and computed in the model's compute dtype.
    `trainable_modules` are modules trained in full (PEFT's modules_to_save), e.g.
    ("embed_tokens", "lm_head").  A starts PEFT-style random, B at zero, so the model's output is
    unchanged until B is trained.
    """
    if getattr(model, "lora_config", None) is not None or has_lora(model):
        raise ValueError("model already has LoRA attached; merge() it or start from a fresh model")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    targets, trainable_modules = tuple(targets), tuple(trainable_modules)
    linears, _ = _select(model, targets, trainable_modules)

    mesh = getattr(model, "mesh", None)
    scale = alpha / rank
    specs = tuple((".".join(p), kernel_shape(lin)) for p, lin in linears)
    # an abstract model (nnx.eval_shape: ShapeDtypeStruct kernels) gets abstract factors, sharded
    # as the concrete ones would be; its dropout keys stay small host arrays
    abstract = any(isinstance(lin.kernel.get_value(), jax.ShapeDtypeStruct) for _, lin in linears)
    factors = _init_factors(seed, specs, rank, dropout > 0, abstract)
    for (path, lin), (a, b, keys) in zip(linears, factors):
        axes = tuple(lin.kernel.axes)
        a_axes, b_axes = axes[:-1] + ("lora_rank",), axes[:-2] + ("lora_rank", axes[-1])
        if abstract:
            if mesh is not None:
                a = jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=named_sharding(mesh, a_axes, a.shape))
                b = jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=named_sharding(mesh, b_axes, b.shape))
        elif mesh is not None:
            a = jax.device_put(a, named_sharding(mesh, a_axes, a.shape))  # straight from host to shards
            b = jax.device_put(b, named_sharding(mesh, b_axes, b.shape))
            if keys is not None:
                keys = jax.device_put(keys, NamedSharding(mesh, P()))
        else:
            a, b = jnp.asarray(a), jnp.asarray(b)
        lin.lora = nnx.data(LoRA(a, b, a_axes, b_axes, scale, dropout, keys))  # Linear declares it static None
    model.lora_config = LoraConfig(rank, alpha, targets, float(dropout), trainable_modules)
    return model


def prepare_frozen(model, *, frozen_dtype=None, quantization: str | None = None, tile: int = 64):
    """After `apply`: the frozen base in `frozen_dtype` (None = the model's compute dtype: a frozen
    base needs no float32 master copy), parameters trained in full (modules_to_save) in float32,
    and with `quantization` (quant.FORMATS) every frozen Linear kernel stored quantized (QLoRA; the
    factors stay float32).  In place; returns the model."""
    cfg = lora_config(model)
    _, full = _select(model, cfg.targets, cfg.trainable_modules)
    return store_frozen(model, full=full, frozen_dtype=frozen_dtype, quantization=quantization, tile=tile)


def store_frozen(model, *, full=frozenset(), frozen_dtype=None, quantization: str | None = None, tile: int = 64):
    """Every base parameter not in `full` (paths) in `frozen_dtype` (None = the compute dtype), those
    in `full` in float32, and with `quantization` every Linear kernel outside `full` stored
    quantized.  For LoRA models (`prepare_frozen`) and for models that never train, such as the
    reward model PPO reads and shares its base with a LoRA critic.  In place; returns the model."""
    fd = jnp.dtype(frozen_dtype or model.config.dtype)
    for path, _ in base_params(model):
        var = _var(model, path)
        w = var.get_value()
        want = jnp.dtype(jnp.float32) if path in full else fd
        if not jnp.issubdtype(w.dtype, jnp.floating) or w.dtype == want:
            continue
        if isinstance(w, jax.ShapeDtypeStruct):
            var.set_value(jax.ShapeDtypeStruct(w.shape, want, sharding=w.sharding))
        else:
            var.set_value(w.astype(want))
    if quantization:
        quantize_model(model, quantization, tile, skip={p[:-1] for p in full if p[-1] == "kernel"})
    return model


def advance_dropout(model) -> None:
    """Move every LoRA dropout stream on by one draw.  The stacked layers run under `lax.scan`,
    whose body's RNG counter updates are not handed back to the model, so without this each step
    would reuse the same masks; call it once per training step (eagerly or inside nnx.jit)."""
    for _, m in nnx.iter_modules(model):
        if isinstance(m, LoRA) and m.dropout.rngs is not None:
            m.dropout.rngs.count[...] += 1


def with_dropout_step(state, n):
    """A copy of an nnx State whose LoRA dropout counters all equal `n` (may be traced).  The
    training loop applies it to the frozen/rest state before rebuilding the model in its jitted
    step, so masks differ every micro-step and a resumed run draws exactly the masks an
    uninterrupted one would.  Functional on purpose: no Variable is mutated under a trace."""
    flat = []
    for path, v in nnx.to_flat_state(state):
        if isinstance(v, nnx.RngCount) and getattr(v, "tag", None) == "dropout":
            old = v.get_value()
            v = v.replace(jnp.broadcast_to(jnp.asarray(n, old.dtype), old.shape))
        flat.append((path, v))
    return nnx.from_flat_state(flat)


# ----------------------------------------------------------------------------- training helpers
def lora_off(state):
    """`state` (an nnx State) with every LoRA update zeroed: the B factors replaced by zeros (A then
    does not matter).  The frozen weights are not copied, so this is the reference policy of a
    LoRA run for free (DPO, PPO, GRPO).  Traceable: use inside jit."""
    flat = [(p, v.replace(jnp.zeros_like(v.get_value())) if isinstance(v, nnx.LoRAParam) and str(p[-1]) == "b" else v)
            for p, v in nnx.to_flat_state(state)]
    return nnx.from_flat_state(flat)


def trainable_filter(model):
    """nnx filter for exactly what trains: LoRA factors + full params of `trainable_modules`."""
    cfg = lora_config(model)
    _, full = _select(model, cfg.targets, cfg.trainable_modules)
    return nnx.Any(nnx.LoRAParam, _Paths(frozenset(full)))


@dataclasses.dataclass(frozen=True)
class _Paths:
    """nnx filter: Params at exactly these paths (hashable, so usable in cached transforms)."""
    paths: frozenset

    def __call__(self, path, x):
        return isinstance(x, nnx.Param) and tuple(str(p) for p in path) in self.paths


def split_trainable(model):
    """(graphdef, trainable, frozen, rest): trainable per `trainable_filter`, frozen = the other
    params, rest = non-parameter state (dropout RNG).  Rebuild with nnx.merge(graphdef, *states)."""
    return nnx.split(model, trainable_filter(model), nnx.Param, ...)


# ----------------------------------------------------------------------------- merge
@jax.jit
def _fold(kernel, a, b, scale):
    delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))  # batched over a stacked axis
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def merge(model):
    """Fold scale * A @ B into each kernel (in the kernel's dtype) and drop the LoRA modules, giving
    a plain model that `llama_jax.save_hf` exports.  A quantized base (QLoRA) is dequantised first
    (to param_dtype), so the factors are folded into the dequantised base.  In place; returns the model."""
    dequantize_model(model)
    for _, lin in _linears(model):
        if lin.lora is None:
            continue
        kernel = lin.kernel.get_value()
        new = _fold(kernel, lin.lora.a.get_value(), lin.lora.b.get_value(), jnp.float32(lin.lora.scale))
        if isinstance(kernel, jax.Array) and new.sharding != kernel.sharding:
            new = jax.device_put(new, kernel.sharding)
        lin.kernel.set_value(new)
    _detach(model)  # Linear.lora back to a static None: the same graphdef as a plain model
    return model


def _detach(model) -> None:
    """Remove the LoRA modules without folding them in."""
    for _, lin in _linears(model):
        lin.lora = nnx.static(None)
    if hasattr(model, "lora_config"):
        del model.lora_config


# ----------------------------------------------------------------------------- PEFT format
def _peft_entries(model):
    """[(peft_key, path, layer|None, kind, per-layer PEFT shape)] for every adapter tensor.
    kind: 'A' (ours [in, r] <-> PEFT [r, in]), 'B' (ours [r, out] <-> [out, r]), 'kernel'
    (full Linear weight, transposed), 'plain' (embedding / norm, as is)."""
    cfg = lora_config(model)
    _, full = _select(model, cfg.targets, cfg.trainable_modules)
    out = []
    for path, lin in _linears(model):
        if lin.lora is None:
            continue
        names = hf_names(path + ("kernel",), model.config)
        a_shape, b_shape = lin.lora.a.get_value().shape, lin.lora.b.get_value().shape
        for letter, shape in (("A", a_shape), ("B", b_shape)):
            for i, n in enumerate(names):
                mod = n[: -len(".weight")]
                out.append((f"{_PEFT_PREFIX}{mod}.lora_{letter}.weight", path + ("lora", letter.lower()),
                            i if path[0] == "layers" else None, letter, tuple(reversed(shape[-2:]))))
    for path, var in base_params(model):
        if path not in full:
            continue
        names = hf_names(path, model.config)
        per = var.get_value().shape[1:] if path[0] == "layers" else var.get_value().shape
        kind = "kernel" if path[-1] == "kernel" else "plain"
        shape = tuple(reversed(per)) if kind == "kernel" else tuple(per)
        for i, n in enumerate(names):
            out.append((_PEFT_PREFIX + n, path, i if path[0] == "layers" else None, kind, shape))
        if path == ("embed_tokens", "embedding") and model.config.tie_word_embeddings:
            # PEFT with ensure_weight_tying wraps the tied lm_head too and stores (and on load
            # expects) its weight under lm_head: the same tensor again.
            out.append((f"{_PEFT_PREFIX}lm_head.weight", path, None, "tied", shape))
    return out


def _peft_base_entries(model, st):
    """PEFT also stores the base weight of LoRA-targeted embedding-like layers (lm_head) as
    '<module>.base_layer.weight' (save_embedding_layers) and loads it over the base model's, so
    we do the same when the file has one.  save_peft does not write these: the base is unchanged."""
    out = []
    for path, lin in _linears(model):
        if lin.lora is None:
            continue
        per = lin.kernel.get_value().shape[-2:]
        names = hf_names(path + ("kernel",), model.config)
        keys = [f"{_PEFT_PREFIX}{n[: -len('.weight')]}.base_layer.weight" for n in names]
        if any(k in st.header for k in keys):  # then all layers must be there: checked by the caller
            out += [(k, path + ("kernel",), i if path[0] == "layers" else None, "kernel", tuple(reversed(per)))
                    for i, k in enumerate(keys)]
    return out


def _var(model, path):
    obj = model
    for p in path:
        obj = getattr(obj, p)
    return obj


def _to_peft(arr, kind):
    return arr if kind in ("plain", "tied") else arr.T  # factors and kernels are stored transposed


def save_peft(model, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None,
              base_model=None, base_tokenizer=None, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(hf_base_model, out_dir)` loads.  Atomic: written to a temporary
    directory that is renamed into place when complete.  extra_files: name -> bytes, written too.

    base_model: also write this (LoRA-free) model as an HF directory `out_dir/base` (with
    base_tokenizer's files) and name its absolute path as base_model_name_or_path, so that
    `peft.AutoPeftModelForCausalLM.from_pretrained(out_dir)` finds it: for runs whose base exists
    nowhere else (a randomly initialised preset)."""
    if base_model is not None:
        base_model_name_or_path = str((Path(out_dir) / PEFT_BASE_DIR).absolute())

    cfg = lora_config(model)
    if model.head != "lm":
        raise ValueError("save_peft: only head='lm' models (PEFT task_type CAUSAL_LM) can be saved as an adapter; "
                         "merge and export a reward/value model with save_hf")
    tensors = []
    for key, path, layer, kind, shape in _peft_entries(model):
        arr = _var(model, path).get_value()

        def produce(arr=arr, layer=layer, kind=kind):
            return _to_peft(to_host(arr[layer] if layer is not None else arr), kind)

        tensors.append((key, shape, np.dtype(arr.dtype), produce))
    adapter_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(cfg.targets),
        "modules_to_save": list(cfg.trainable_modules) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    if model.config.tie_word_embeddings and ("embed_tokens", "embedding") in _select(model, cfg.targets,
                                                                                     cfg.trainable_modules)[1]:
        # Tied output projection: ask PEFT to keep lm_head tied to the trained embedding.
        adapter_cfg["ensure_weight_tying"] = True
    if jax.process_index() != 0:  # every process joins the gathers, process 0 writes
        for t in tensors:
            t[3]()
        if base_model is not None:
            save_hf(base_model, Path(out_dir) / PEFT_BASE_DIR)
        return Path(out_dir)
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, replace=True) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_cfg, indent=2) + "\n")
        write_file(tmp / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
        if base_model is not None:
            save_hf(base_model, tmp / PEFT_BASE_DIR, tokenizer=base_tokenizer)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return out_dir


def _read_adapter_config(adapter_dir: Path) -> LoraConfig:
    f = adapter_dir / ADAPTER_CONFIG
    if not f.exists():
        raise ValueError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a PEFT adapter directory)")
    c = json.loads(f.read_text())
    bad = []
    if c.get("peft_type") != "LORA":
        bad.append(f"peft_type={c.get('peft_type')!r} (only LORA)")
    for flag in ("fan_in_fan_out", "use_dora", "use_rslora"):
        if c.get(flag):
            bad.append(f"{flag}=true")
    if c.get("bias", "none") != "none":
        bad.append(f"bias={c['bias']!r}")
    for k in ("rank_pattern", "alpha_pattern"):
        if c.get(k):
            bad.append(f"{k} (per-module ranks)")
    if c.get("layers_to_transform") is not None:
        bad.append("layers_to_transform")
    if not isinstance(c.get("target_modules"), list):
        bad.append(f"target_modules={c.get('target_modules')!r} (only a list of module names)")
    if bad:
        raise ValueError(f"{f}: unsupported adapter settings: {', '.join(bad)}")
    # Names are kept as written: _select applies PEFT's own matching rules to them.
    return LoraConfig(int(c["r"]), c["lora_alpha"], tuple(dict.fromkeys(c["target_modules"])),
                      float(c.get("lora_dropout") or 0.0), tuple(dict.fromkeys(c.get("modules_to_save") or ())))


def load_peft(model, adapter_dir: str | os.PathLike):
    """Load a PEFT LoRA adapter into `model` (in place; returns it).  A model without LoRA gets
    `apply`'d with the adapter's settings first; one with LoRA must have the same settings.
    Every tensor is checked (present, right shape) and every tensor in the file must be used."""
    adapter_dir = Path(adapter_dir)
    want = _read_adapter_config(adapter_dir)
    have = getattr(model, "lora_config", None)
    if have is None:
        apply(model, rank=want.rank, alpha=want.alpha, targets=want.targets, dropout=want.dropout,
              trainable_modules=want.trainable_modules)
        try:
            return _fill_from_peft(model, adapter_dir)
        except BaseException:
            _detach(model)  # leave the model as it came: no half-loaded adapter
            raise
    else:
        def layout(c):  # what the names select, so equivalent spellings compare equal
            linears, full = _select(model, c.targets, c.trainable_modules)
            return c.rank, c.alpha, sorted(p for p, _ in linears), sorted(full)

        if layout(have) != layout(want):
            raise ValueError(f"{adapter_dir / ADAPTER_CONFIG}: adapter settings {want} differ from the "
                             f"model's LoRA {have}")
        return _fill_from_peft(model, adapter_dir)


def _fill_from_peft(model, adapter_dir: Path):
    """Check every tensor first (present, right shape, none left over), then set them."""
    wfile = adapter_dir / ADAPTER_WEIGHTS
    if not wfile.exists():
        raise ValueError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}")
    st = SafetensorsFile(wfile)
    grouped: dict[tuple, list] = {}
    for key, path, layer, kind, shape in _peft_entries(model) + _peft_base_entries(model, st):
        if key not in st.header:
            raise ValueError(f"{wfile}: tensor '{key}' is missing (needed for {'.'.join(path)})")
        if st.shape(key) != shape:
            raise ValueError(f"{wfile}: tensor '{key}' has shape {list(st.shape(key))}, expected {list(shape)}")
        grouped.setdefault(path, []).append((layer, key, kind))
    used = {k for entries in grouped.values() for _, k, _ in entries}
    unused = sorted(set(st.keys()) - used)
    if unused:
        raise ValueError(f"{wfile}: {len(unused)} tensor(s) not used by this model, e.g. {', '.join(unused[:5])}")
    for path, entries in grouped.items():
        entries = [e for e in entries if e[2] != "tied"]  # the tied copy: shape-checked above
        var = _var(model, path)
        old = var.get_value()
        parts = [np.asarray(_to_peft(st.get(k), kind)) for _, k, kind in sorted(entries, key=lambda e: e[0] or 0)]
        new = np.stack(parts) if entries[0][0] is not None else parts[0]
        new = jnp.asarray(new, dtype=old.dtype)
        if isinstance(old, jax.Array):
            new = jax.device_put(new, old.sharding)
        var.set_value(new)
    return model

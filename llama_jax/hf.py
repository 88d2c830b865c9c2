"""HF Llama checkpoints <-> llama_jax models.

Import streams tensor by tensor: each parameter is built with `jax.make_array_from_callback`, whose
callback cuts the device's shard straight out of the memory-mapped safetensors file, so host RAM
never holds the model twice and each host of a multi-host job reads only its own shards.
Everything is checked: each expected tensor present with the right shape, and each tensor in the
files used.  Export writes config.json, generation_config.json and sharded safetensors with an
index into a temporary directory that is renamed into place only when complete.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .checkpoint import load_checkpoint
from .config import LlamaConfig
from .fsutil import atomic_output_dir
from .model import Llama, abstract_model, has_lora, platform_compute_dtype
from .safetensors_io import SafetensorsFile, write_file
from .sharding import named_sharding, to_host
from .tokenizer.hf_files import write_hf_files
from .tokenizer.sp_model import load_model_proto


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked: the message names file and tensor."""


# ----------------------------------------------------------------------------- name mapping
def hf_names(path: tuple[str, ...], cfg: LlamaConfig) -> list[str]:
    """HF tensor names for one of our parameters (one per layer for stacked parameters)."""
    leaf = {"kernel": "weight", "weight": "weight", "embedding": "weight"}[path[-1]]
    if path[0] == "layers":
        mid = ".".join(path[1:-1])
        return [f"model.layers.{i}.{mid}.{leaf}" for i in range(cfg.num_hidden_layers)]
    if path[0] in ("embed_tokens", "norm"):
        return [f"model.{path[0]}.{leaf}"]
    return [f"{path[0]}.{leaf}"]  # lm_head, score


def _is_kernel(path) -> bool:
    return path[-1] == "kernel"  # ours [in, out], HF's [out, in]


def base_params(model: Llama):
    """(path, Variable) for the weights that exist in an HF checkpoint (LoRA factors excluded)."""
    state = nnx.state(model, nnx.Param)
    out = []
    for path, var in nnx.to_flat_state(state):
        path = tuple(str(p) for p in path)
        if "lora" in path:
            continue
        out.append((path, var))
    return out


# ----------------------------------------------------------------------------- reading
class _TorchBinFile:
    """A pytorch_model*.bin pickle, only when the user allowed pickles."""

    def __init__(self, path: Path):
        import torch

        self.path = path
        self._t = torch.load(path, map_location="cpu", weights_only=True)

    def keys(self):
        return list(self._t)

    def shape(self, name):
        return tuple(self._t[name].shape)

    def get(self, name):
        t = self._t[name]
        return (t.float() if t.dtype.is_floating_point else t).numpy()


def _weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    idx = path / "model.safetensors.index.json"
    if idx.exists():
        try:
            wm = json.loads(idx.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{idx}: not a valid safetensors index ({e})") from None
        files = sorted({path / f for f in wm.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{idx}: lists shard files that do not exist: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: only PyTorch pickle weights ({bins[0].name}) found; pickles can run code, so they "
                "are loaded only with allow_pickle=True (CLI: --allow-pickle). Prefer safetensors.")
        return bins
    raise CheckpointError(f"{path}: no weights found (expected model.safetensors, "
                          "model.safetensors.index.json or *.safetensors)")


def _open(f: Path):
    return _TorchBinFile(f) if f.suffix == ".bin" else SafetensorsFile(f)


def load(path: str | os.PathLike, dtype: Any = None, mesh=None, *, allow_pickle: bool = False,
         head: str | None = None, **runtime) -> Llama:
    """Load a local HF Llama directory or a llama_jax checkpoint directory.

    dtype: parameter and compute dtype (default: the checkpoint's `torch_dtype`, else float32).
    mesh: place every tensor straight onto its NamedSharding on this mesh.
    runtime: LlamaConfig runtime options (scan_layers, remat, attention_impl, param_dtype, ...).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir() and (path / "llama_jax.json").exists():
        return load_checkpoint(path, dtype=dtype, mesh=mesh, **runtime)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json (expected a HF Llama directory or a llama_jax checkpoint)")
    raw_cfg = json.loads(cfg_file.read_text())
    files = _weight_files(path, allow_pickle)
    if dtype is None:
        dtype = raw_cfg.get("dtype") or raw_cfg.get("torch_dtype") or "float32"
    dtype = jnp.dtype(dtype).name
    runtime.setdefault("dtype", dtype)
    runtime.setdefault("param_dtype", dtype)
    runtime["dtype"] = platform_compute_dtype(runtime["dtype"], source=path)
    cfg = LlamaConfig.from_json_file(cfg_file, **runtime)
    if head is None:
        head = "score" if "LlamaForSequenceClassification" in (raw_cfg.get("architectures") or []) else "lm"
    return load_weights(abstract_model(cfg, head=head, mesh=mesh), files, mesh=mesh)


def load_weights(model: Llama, files: list[Path], mesh=None) -> Llama:
    """Fill an abstract model's parameters from HF weight files (shape-checked, all used)."""
    cfg = model.config
    where: dict[str, Any] = {}
    for f in files:
        h = _open(f)
        for k in h.keys():
            where[k] = h
    graphdef, state = nnx.split(model)
    used: set[str] = set()
    leaves = {}
    for path, var in base_params(model):
        names = hf_names(path, cfg)
        per_shape = var.get_value().shape[1:] if path[0] == "layers" else var.get_value().shape
        hf_shape = tuple(reversed(per_shape)) if _is_kernel(path) else tuple(per_shape)
        for n in names:
            if n not in where:
                raise CheckpointError(f"{files[0].parent}: tensor '{n}' is missing (needed for {'.'.join(path)})")
            got = tuple(where[n].shape(n))
            if got != hf_shape:
                raise CheckpointError(f"{where[n].path.name}: tensor '{n}' has shape {list(got)}, "
                                      f"expected {list(hf_shape)} from config.json")
        used.update(names)
        leaves[path] = _build_array(var, [where[n] for n in names], names, path, mesh)
    if cfg.tie_word_embeddings:
        used.add("lm_head.weight")  # some tied checkpoints still carry the copy
    unused = sorted(k for k in where if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if unused:
        raise CheckpointError(f"{files[0].parent}: {len(unused)} tensor(s) were not used, e.g. "
                              f"{', '.join(unused[:5])} (not a plain Llama checkpoint?)")
    flat = nnx.to_flat_state(state)
    new = []
    for path, var in flat:
        key = tuple(str(p) for p in path)
        new.append((path, var.replace(leaves[key]) if key in leaves else var))
    return nnx.merge(graphdef, nnx.from_flat_state(new))


def _build_array(var, handles, names, path, mesh):
    shape, dtype = var.get_value().shape, var.get_value().dtype
    stacked = path[0] == "layers"
    kernel = _is_kernel(path)
    if mesh is not None:
        sharding = named_sharding(mesh, var.axes, shape)
    else:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def tensor(i):
        t = handles[i].get(names[i])
        return t.T if kernel else t

    def callback(index):
        if not stacked:
            return np.asarray(tensor(0)[index], dtype=dtype)
        layers = range(*index[0].indices(shape[0]))
        return np.stack([np.asarray(tensor(l)[index[1:]], dtype=dtype) for l in layers])

    return jax.make_array_from_callback(shape, sharding, callback)


# ----------------------------------------------------------------------------- writing
def hf_tensors(model: Llama, dtype=None) -> list[tuple[str, tuple, np.dtype, Any]]:
    """(HF name, shape, dtype, producer) for every weight, in HF order, produced lazily."""
    cfg = model.config
    out = []
    for path, var in base_params(model):
        arr = var.get_value()
        dt = np.dtype(jnp.dtype(dtype or arr.dtype))
        names = hf_names(path, cfg)
        kernel = _is_kernel(path)
        per = arr.shape[1:] if path[0] == "layers" else arr.shape
        hf_shape = tuple(reversed(per)) if kernel else tuple(per)
        for i, n in enumerate(names):
            def produce(arr=arr, i=i, stacked=path[0] == "layers", kernel=kernel, dt=dt):
                t = to_host(arr[i] if stacked else arr)
                return (t.T if kernel else t).astype(dt)
            out.append((n, hf_shape, dt, produce))

    def order(e):
        n = e[0]
        if n.startswith("model.layers."):
            return (1, int(n.split(".")[2]), n)
        return (0 if n.startswith("model.embed") else 2, 0, n)

    return sorted(out, key=order)


def save_hf(model: Llama, out_dir: str | os.PathLike, tokenizer=None, *, dtype=None,
            max_shard_bytes: int = 5 * 1024 ** 3, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write an HF directory transformers loads: config.json, generation_config.json, safetensors
    (sharded with model.safetensors.index.json when larger than max_shard_bytes), tokenizer files,
    `extra_files` (name -> bytes).  The directory appears only once complete (temporary directory,
    then rename)."""
    if has_lora(model):
        raise ValueError("save_hf: the model has LoRA factors attached; merge them first "
                         "(llama_jax.lora.merge) or export the adapter with lora.save_peft")
    tensors = hf_tensors(model, dtype)
    cfg = model.config
    param_dtype = np.dtype(tensors[0][2]).name if tensors else cfg.param_dtype
    arch = "LlamaForSequenceClassification" if model.head == "score" else "LlamaForCausalLM"
    hf_cfg = cfg.replace(param_dtype=param_dtype).to_hf_dict(arch)
    if model.head == "score":
        hf_cfg["num_labels"] = 1
        hf_cfg["id2label"], hf_cfg["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    if jax.process_index() != 0:  # every process joins the gathers, process 0 writes
        for t in tensors:
            t[3]()
        return Path(out_dir)
    return write_hf_dir(out_dir, hf_cfg, generation_config(cfg), tensors, tokenizer=tokenizer,
                        max_shard_bytes=max_shard_bytes, extra_files=extra_files)


def generation_config(cfg: LlamaConfig) -> dict:
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
    if cfg.pad_token_id is not None:
        gen["pad_token_id"] = cfg.pad_token_id
    return gen


def write_hf_dir(out_dir: str | os.PathLike, hf_cfg: dict, gen_cfg: dict, tensors: list, tokenizer=None, *,
                 max_shard_bytes: int = 5 * 1024 ** 3, extra_files: dict[str, bytes] | None = None) -> Path:
    """The one HF-directory writer (save_hf and llama_jax.convert use it): config.json,
    generation_config.json, safetensors from (HF name, shape, dtype, producer) entries (each producer
    called once, when its bytes are due; sharded with model.safetensors.index.json above
    max_shard_bytes), tokenizer files (from `tokenizer`, see save_tokenizer_files) and `extra_files`
    (name -> bytes, written as given).  Built in a temporary directory beside out_dir and renamed
    into place only when complete: on any error nothing is left behind."""
    out_dir = Path(out_dir)
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        nbytes = int(np.prod(t[1])) * np.dtype(t[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    with atomic_output_dir(out_dir, replace=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
        if len(shards) == 1:
            write_file(tmp / "model.safetensors", shards[0], metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_file(tmp / name, shard, metadata={"format": "pt"})
                for t in shard:
                    weight_map[t[0]] = name
                    total += int(np.prod(t[1])) * np.dtype(t[2]).itemsize
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            save_tokenizer_files(tokenizer, tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return out_dir


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")


def save_tokenizer_files(tokenizer, out: Path) -> None:
    """Tokenizer files from an HF tokenizer object, a tokenizer directory or a tokenizer.model."""
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
        return
    src = Path(tokenizer)
    if src.is_dir():
        found = [src / n for n in TOKENIZER_FILES if (src / n).exists()]
        if not found:
            raise CheckpointError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        for f in found:
            shutil.copy2(f, out / f.name)
    elif src.suffix == ".model":
        shutil.copy2(src, out / "tokenizer.model")
        write_hf_files(load_model_proto(src), out)
    else:
        raise CheckpointError(f"{src}: not a tokenizer directory or tokenizer.model")

"""`llama-jax convert`: Meta's original Llama-2 release and llama2.c `.bin` files -> an HF Llama directory.

Contract:
- The output is what `llama_jax.save_hf` writes (it goes through the same `hf.write_hf_dir`):
  config.json, generation_config.json, safetensors (sharded with an index above
  `max_shard_bytes`), tokenizer files when a tokenizer.model is given or found.  Both
  `llama_jax.load` and transformers read it and compute the same logits as the source model.
- Layout facts this relies on:
  * Meta (`params.json` + `consolidated.NN.pth`, NN = model-parallel rank): column-parallel
    weights (wq, wk, wv, w1, w3, output) are split over ranks along dim 0, row-parallel ones
    (wo, w2) along dim 1, `tok_embeddings` along dim 1 (Meta's ParallelEmbedding splits the
    embedding dimension), norms are replicated.  The intermediate size is
    multiple_of * ceil(int(ffn_dim_multiplier * int(8 * dim / 3)) / multiple_of).
  * Meta and llama2.c rotate interleaved pairs (x[2i], x[2i+1]) of each head; HF rotates halves
    (x[i], x[i + D/2]).  The rows of wq and wk are permuted per head so that the HF model computes
    the same function: row 2i -> i, row 2i+1 -> i + D/2.
  * llama2.c legacy `.bin`: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
    seq_len; vocab_size < 0 = separate classifier), then float32 [out, in] tensors: embedding,
    attention norms, wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm, freq_cis real / imaginary
    (skipped), classifier (only when not shared).
- Memory: nothing is read up front.  Meta shards are opened with
  `torch.load(weights_only=True, mmap=True)` (no pickled code runs; tensors are views of the
  mapped files) and llama2.c files with `numpy.memmap`; each output tensor is assembled from its
  shards when the writer needs its bytes and dropped after, so the host holds at most one full
  tensor (plus page cache), never the model twice.  torch is imported only for `--format meta`.
- Refused, with one `ConvertError` naming the file (and tensor / field): unknown params.json keys,
  missing or extra shards, shards that disagree in keys, shape or dtype, a merged shape that does
  not match params.json, truncated or non-checkpoint files, a llama2.c header whose sizes do not
  add up to the file's byte count, llama2.c's newer versioned `.bin` formats.  The output
  directory is built beside `out` and renamed into place only when complete.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from .config import LlamaConfig
from .hf import generation_config, write_hf_dir
from .tokenizer.hf_files import UnsupportedNormalizerError, hf_config_files
from .tokenizer.sp_model import load_model_proto

log = logging.getLogger(__name__)

FORMATS = ("meta", "llama2c")
OUT_DTYPES = ("float32", "bfloat16", "float16")


class ConvertError(ValueError):
    """A source checkpoint that cannot be converted: the message names the file (and tensor / field)."""


@dataclass
class ConvertConfig:
    format: str                       # "meta" or "llama2c"
    src: Path                         # meta: the directory with params.json; llama2c: the .bin file
    out: Path                         # the HF directory to write
    tokenizer: Path | None = None     # tokenizer.model (default: found beside the source, else none)
    dtype: str | None = None          # output dtype (default: the source's: bf16 for Meta, f32 for llama2.c)
    max_position_embeddings: int | None = None  # default: params.json max_seq_len, else 4096 (Llama-2)
    max_shard_bytes: int = 5 * 1024 ** 3
    progress: bool = True

    def __post_init__(self):
        self.src, self.out = Path(self.src), Path(self.out)
        self.tokenizer = Path(self.tokenizer) if self.tokenizer is not None else None
        if self.format not in FORMATS:
            raise ConvertError(f"--format {self.format!r}: expected one of {', '.join(FORMATS)}")
        if self.dtype is not None and self.dtype not in OUT_DTYPES:
            raise ConvertError(f"--dtype {self.dtype!r}: expected one of {', '.join(OUT_DTYPES)}")


# A tensor to write: (HF name, shape, producer of a numpy array in any float dtype).
Source = tuple[str, tuple, Callable[[], np.ndarray]]


def rope_interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a [n_heads * D, in] projection from interleaved-pair rotary order to rotate-half order."""
    out, inp = w.shape
    d = out // n_heads
    return w.reshape(n_heads, d // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def rope_half_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of rope_interleaved_to_half (HF -> Meta / llama2.c row order)."""
    out, inp = w.shape
    d = out // n_heads
    return w.reshape(n_heads, 2, d // 2, inp).swapaxes(1, 2).reshape(out, inp)


def ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward sizing (llama/model.py): 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# ----------------------------------------------------------------------------- llama2.c
LLAMA2C_HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
_LLAMA2C_MAGIC = 0x616B3432  # "ak42": llama2.c's versioned export formats (export.py --version 1/2)


def read_llama2c(path: Path) -> tuple[LlamaConfig, list[Source], np.dtype]:
    """A llama2.c legacy checkpoint as (config, tensors, their dtype); checks the byte count against the header."""
    if not path.is_file():
        raise ConvertError(f"{path}: no such file (expected a llama2.c .bin checkpoint)")
    size = path.stat().st_size
    if size < 28:
        raise ConvertError(f"{path}: {size} bytes, too short for llama2.c's 28-byte header")
    header = np.fromfile(path, dtype="<i4", count=7)
    if int(header[0]) == _LLAMA2C_MAGIC:
        raise ConvertError(f"{path}: a versioned llama2.c export (magic 'ak42', version {int(header[1])}); only the "
                           "legacy format is supported (llama2.c export.py --version 0)")
    h = dict(zip(LLAMA2C_HEADER, (int(x) for x in header)))
    bad = [k for k in LLAMA2C_HEADER if (h[k] <= 0 if k != "vocab_size" else h[k] == 0)]
    if bad:
        raise ConvertError(f"{path}: header field(s) {', '.join(f'{k}={h[k]}' for k in bad)} must be positive "
                           "(not a llama2.c legacy checkpoint?)")
    dim, hidden, L, nh, nkv, seq = h["dim"], h["hidden_dim"], h["n_layers"], h["n_heads"], h["n_kv_heads"], h["seq_len"]
    shared, vocab = h["vocab_size"] > 0, abs(h["vocab_size"])
    if dim % nh or nh % nkv or (dim // nh) % 2:
        raise ConvertError(f"{path}: header dim={dim}, n_heads={nh}, n_kv_heads={nkv} is not a valid Llama shape")
    hs = dim // nh
    kv = nkv * hs
    layout = [("tok_embeddings", (vocab, dim)), ("attention_norm", (L, dim)), ("wq", (L, dim, dim)),
              ("wk", (L, kv, dim)), ("wv", (L, kv, dim)), ("wo", (L, dim, dim)), ("ffn_norm", (L, dim)),
              ("w1", (L, hidden, dim)), ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)), ("norm", (dim,)),
              ("freq_cis_real", (seq, hs // 2)), ("freq_cis_imag", (seq, hs // 2))]
    if not shared:
        layout.append(("output", (vocab, dim)))
    need = 28 + 4 * sum(math.prod(s) for _, s in layout)
    if size != need:
        what = "truncated" if size < need else "longer than its header says"
        raise ConvertError(f"{path}: {what}: the header ({', '.join(f'{k}={h[k]}' for k in LLAMA2C_HEADER)}) "
                           f"needs {need} bytes, the file has {size}")
    mm = np.memmap(path, dtype="<f4", mode="r", offset=28, shape=((size - 28) // 4,))
    t, off = {}, 0
    for name, shape in layout:
        n = math.prod(shape)
        t[name] = mm[off:off + n].reshape(shape)
        off += n
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=L,
                      num_attention_heads=nh, num_key_value_heads=nkv, max_position_embeddings=seq,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=shared)
    # llama2.c's run.c: eps 1e-5, theta 10000 (both hard-coded there)

    def layer(name, i, perm=None):
        def produce():
            w = t[name][i]
            return rope_interleaved_to_half(np.asarray(w), perm) if perm else w
        return produce

    out: list[Source] = [("model.embed_tokens.weight", (vocab, dim), lambda: t["tok_embeddings"])]
    for i in range(L):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (dim,), layer("attention_norm", i)),
                (p + "self_attn.q_proj.weight", (dim, dim), layer("wq", i, nh)),
                (p + "self_attn.k_proj.weight", (kv, dim), layer("wk", i, nkv)),
                (p + "self_attn.v_proj.weight", (kv, dim), layer("wv", i)),
                (p + "self_attn.o_proj.weight", (dim, dim), layer("wo", i)),
                (p + "post_attention_layernorm.weight", (dim,), layer("ffn_norm", i)),
                (p + "mlp.gate_proj.weight", (hidden, dim), layer("w1", i)),
                (p + "mlp.down_proj.weight", (dim, hidden), layer("w2", i)),
                (p + "mlp.up_proj.weight", (hidden, dim), layer("w3", i))]
    out.append(("model.norm.weight", (dim,), lambda: t["norm"]))
    if not shared:
        out.append(("lm_head.weight", (vocab, dim), lambda: t["output"]))
    return cfg, out, np.dtype(np.float32)


# ----------------------------------------------------------------------------- Meta
META_PARAMS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "max_seq_len", "max_batch_size", "use_scaled_rope"}
# per-layer Meta name -> (HF name, dim the model-parallel shards are concatenated on (None =
# replicated), rotary heads key for the permutation)
_META_LAYER = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0, "n_heads"),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0, "n_kv_heads"),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0, None),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1, None),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0, None),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1, None),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0, None),
    "attention_norm.weight": ("input_layernorm.weight", None, None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None, None),
}
_META_TOP = {"tok_embeddings.weight": ("model.embed_tokens.weight", 1),
             "norm.weight": ("model.norm.weight", None),
             "output.weight": ("lm_head.weight", 0)}
_META_IGNORED = ("rope.freqs",)  # LLaMA-1 checkpoints carry the precomputed rotary table


def meta_shard_paths(src: Path) -> list[Path]:
    shards = sorted(src.glob("consolidated.*.pth"))
    if not shards:
        raise ConvertError(f"{src}: no consolidated.NN.pth files (expected Meta's release layout)")
    ranks = []
    for s in shards:
        m = re.fullmatch(r"consolidated\.(\d+)\.pth", s.name)
        if not m:
            raise ConvertError(f"{s}: not a consolidated.NN.pth shard name")
        ranks.append(int(m.group(1)))
    missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
    if missing:
        raise ConvertError(f"{src}: model-parallel shard(s) {', '.join(f'consolidated.{r:02d}.pth' for r in missing)} "
                           f"missing (found {', '.join(s.name for s in shards)})")
    return [s for _, s in sorted(zip(ranks, shards))]


def read_meta_params(path: Path) -> dict:
    if not path.is_file():
        raise ConvertError(f"{path}: no params.json (expected Meta's release layout: params.json + consolidated.NN.pth)")
    try:
        p = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(p, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    unknown = sorted(set(p) - META_PARAMS)
    if unknown:
        raise ConvertError(f"{path}: unknown key(s) {', '.join(unknown)}: this converter knows "
                           f"{', '.join(sorted(META_PARAMS))} and refuses what it cannot honour")
    for k in ("dim", "n_layers", "n_heads", "norm_eps"):
        if k not in p:
            raise ConvertError(f"{path}: field '{k}' is missing")
    if p.get("use_scaled_rope"):
        raise ConvertError(f"{path}: field 'use_scaled_rope': Llama-3.1 rope scaling is not supported")
    return p


def read_meta(src: Path, max_position_embeddings: int | None = None) -> tuple[LlamaConfig, list[Source], np.dtype]:
    """Meta's release directory as (config, tensors, their dtype); model-parallel shards are merged per tensor."""
    import torch  # only this command needs torch

    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory (expected Meta's release layout: params.json + consolidated.NN.pth)")
    params_file = src / "params.json"
    p = read_meta_params(params_file)
    paths = meta_shard_paths(src)
    shards = []
    for f in paths:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # truncated zip, not a checkpoint, pickled code refused by weights_only
            raise ConvertError(f"{f}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ConvertError(f"{f}: expected a flat dict of tensors")
        shards.append(sd)
    mp = len(shards)
    keys0 = set(shards[0])
    for f, sd in zip(paths[1:], shards[1:]):
        if set(sd) != keys0:
            diff = sorted(set(sd) ^ keys0)
            raise ConvertError(f"{f}: tensor names differ from {paths[0].name} (e.g. {', '.join(diff[:3])})")

    dim, L, nh = int(p["dim"]), int(p["n_layers"]), int(p["n_heads"])
    nkv = int(p.get("n_kv_heads") or nh)
    if dim % nh or nh % nkv or (dim // nh) % 2:
        raise ConvertError(f"{params_file}: dim={dim}, n_heads={nh}, n_kv_heads={nkv} is not a valid Llama shape")
    hs = dim // nh
    if "tok_embeddings.weight" not in keys0:
        raise ConvertError(f"{paths[0]}: tensor 'tok_embeddings.weight' is missing")
    vocab = int(p.get("vocab_size", -1))
    if vocab <= 0:  # Llama-2's params.json says -1: the tokenizer's size, i.e. the embedding's rows
        vocab = int(shards[0]["tok_embeddings.weight"].shape[0])
    if "multiple_of" in p:
        hidden = ffn_hidden_size(dim, int(p["multiple_of"]), p.get("ffn_dim_multiplier"))
    elif "layers.0.feed_forward.w1.weight" in keys0:
        hidden = int(shards[0]["layers.0.feed_forward.w1.weight"].shape[0]) * mp
    else:
        raise ConvertError(f"{params_file}: field 'multiple_of' is missing")
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=L,
                      num_attention_heads=nh, num_key_value_heads=nkv,
                      max_position_embeddings=int(max_position_embeddings or p.get("max_seq_len") or 4096),
                      rms_norm_eps=float(p["norm_eps"]), rope_theta=float(p.get("rope_theta", 10000.0)),
                      tie_word_embeddings=False)

    expected = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    per_layer = {"attention.wq.weight": (dim, dim), "attention.wk.weight": (nkv * hs, dim),
                 "attention.wv.weight": (nkv * hs, dim), "attention.wo.weight": (dim, dim),
                 "feed_forward.w1.weight": (hidden, dim), "feed_forward.w2.weight": (dim, hidden),
                 "feed_forward.w3.weight": (hidden, dim), "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,)}
    plan: list[tuple[str, str, int | None, int | None]] = [("tok_embeddings.weight", *_META_TOP["tok_embeddings.weight"], None)]
    for i in range(L):
        for k, (hf, cat, heads) in _META_LAYER.items():
            expected[f"layers.{i}.{k}"] = per_layer[k]
            plan.append((f"layers.{i}.{k}", f"model.layers.{i}.{hf}", cat, nkv if heads == "n_kv_heads" else
                         nh if heads else None))
    plan += [("norm.weight", "model.norm.weight", None, None), ("output.weight", "lm_head.weight", 0, None)]
    extra = sorted(k for k in keys0 if k not in expected and not k.endswith(_META_IGNORED))
    if extra:
        raise ConvertError(f"{paths[0]}: {len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:5])} "
                           f"(params.json says n_layers={L})")

    dtype0 = shards[0]["tok_embeddings.weight"].dtype
    cat_of = {m: c for m, _, c, _ in plan}
    for key, shape in expected.items():
        if key not in keys0:
            raise ConvertError(f"{paths[0]}: tensor '{key}' is missing")
        got = [tuple(sd[key].shape) for sd in shards]
        for f, sd, g in zip(paths, shards, got):
            if g != got[0] or sd[key].dtype != dtype0:
                raise ConvertError(f"{f}: tensor '{key}' is {list(g)} {sd[key].dtype}, but {list(got[0])} {dtype0} "
                                   f"in {paths[0].name}: the shards disagree")
        cat = cat_of[key]
        merged = list(got[0])
        if cat is not None:
            merged[cat] *= mp
        if tuple(merged) != shape:
            raise ConvertError(f"{paths[0].parent}: tensor '{key}' merges to {merged} over {mp} shard(s), expected "
                               f"{list(shape)} from params.json (missing shards or wrong params.json?)")

    def producer(key, cat, heads):
        def produce():
            parts = [sd[key] for sd in shards]
            if cat is None:
                for f, t in zip(paths[1:], parts[1:]):  # replicated: every rank must hold the same values
                    if not torch.equal(t, parts[0]):
                        raise ConvertError(f"{f}: replicated tensor '{key}' differs from {paths[0].name}")
                w = parts[0]
            else:
                w = parts[0] if mp == 1 else torch.cat(parts, dim=cat)
            arr = torch_to_numpy(w)
            return rope_interleaved_to_half(arr, heads) if heads else arr
        return produce

    out = [(hf, expected[m], producer(m, cat, heads)) for m, hf, cat, heads in plan]
    return cfg, out, torch_to_numpy(shards[0]["norm.weight"][:0]).dtype


def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor as numpy without a float32 round trip (bfloat16 via ml_dtypes)."""
    import torch

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


# ----------------------------------------------------------------------------- driver
def _tokenizer_for(cc: ConvertConfig) -> Path | None:
    if cc.tokenizer is not None:
        if not cc.tokenizer.is_file():
            raise ConvertError(f"{cc.tokenizer}: --tokenizer: no such file (expected a sentencepiece tokenizer.model)")
        return cc.tokenizer
    if cc.format == "meta":  # Meta ships it one level above the model directories
        cands = (cc.src / "tokenizer.model", cc.src.parent / "tokenizer.model")
    else:
        cands = (cc.src.parent / "tokenizer.model",)
    for cand in cands:
        if cand.is_file():
            log.warning("convert: using the tokenizer %s (pass --tokenizer to choose another)", cand)
            return cand
    return None


def convert(cc: ConvertConfig) -> Path:
    """Convert cc.src into an HF directory at cc.out (atomically); returns cc.out."""
    cfg, sources, src_dtype = (read_meta(cc.src, cc.max_position_embeddings) if cc.format == "meta"
                               else read_llama2c(cc.src))
    if cc.format == "llama2c" and cc.max_position_embeddings:
        cfg = cfg.replace(max_position_embeddings=cc.max_position_embeddings)
    tok = _tokenizer_for(cc)
    tok_files: dict[str, bytes] = {}
    if tok is not None:
        cfg, tok_files = tokenizer_files(tok, cfg)
    else:
        log.warning("convert: no tokenizer.model given or found beside %s; writing no tokenizer files", cc.src)

    out_dtype = np.dtype(jnp_name_to_numpy(cc.dtype)) if cc.dtype else None
    entries = []
    bar = _progress(cc, sum(math.prod(s) for _, s, _ in sources))
    for name, shape, produce in sources:
        def cast(produce=produce, name=name, shape=shape):
            arr = np.asarray(produce())
            if tuple(arr.shape) != tuple(shape):  # the readers check shapes first; this guards the permutations
                raise ConvertError(f"{cc.src}: tensor {name} came out {list(arr.shape)}, expected {list(shape)}")
            if bar is not None:
                bar.update(arr.size)
            return arr.astype(out_dtype or arr.dtype, copy=False)
        entries.append((name, tuple(shape), out_dtype or src_dtype, cast))
    hf_cfg = cfg.replace(param_dtype=np.dtype(out_dtype or src_dtype).name).to_hf_dict("LlamaForCausalLM")
    try:
        return write_hf_dir(cc.out, hf_cfg, generation_config(cfg), entries, max_shard_bytes=cc.max_shard_bytes,
                            extra_files=tok_files)
    finally:
        if bar is not None:
            bar.close()


def tokenizer_files(tok: Path, cfg: LlamaConfig) -> tuple[LlamaConfig, dict[str, bytes]]:
    """tokenizer.model (+ tokenizer.json & co. when they can encode exactly like it), all built
    before anything is written; the config takes the tokenizer's bos / eos / pad ids."""
    try:
        proto = load_model_proto(tok)
    except Exception as e:
        raise ConvertError(f"{tok}: not a sentencepiece model ({e})") from None
    if len(proto.pieces) > cfg.vocab_size:
        raise ConvertError(f"{tok}: {len(proto.pieces)} pieces, but the checkpoint has only {cfg.vocab_size} "
                           "embedding rows: not this model's tokenizer")
    spec = proto.trainer_spec
    cfg = cfg.replace(bos_token_id=spec.bos_id if spec.bos_id >= 0 else None,
                      eos_token_id=spec.eos_id if spec.eos_id >= 0 else None,
                      pad_token_id=spec.pad_id if spec.pad_id >= 0 else None)
    files = {"tokenizer.model": tok.read_bytes()}
    try:
        files.update({k: v.encode("utf-8") for k, v in hf_config_files(proto).items()})
    except UnsupportedNormalizerError as e:
        # e.g. llama2.c's tok512 (remove_extra_whitespaces=true): a tokenizer.json would encode some
        # texts differently, so only tokenizer.model is written (llama_jax reads it directly)
        log.warning("convert: %s: %s; writing tokenizer.model only (no tokenizer.json)", tok, e)
    return cfg, files


def jnp_name_to_numpy(name: str):
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def _progress(cc: ConvertConfig, total: int):
    if not cc.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"convert {cc.src.name}", unit="param", unit_scale=True, dynamic_ncols=True)


def cmd_convert(args) -> int:
    cc = ConvertConfig(format=args.format, src=args.src, out=args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                       max_position_embeddings=args.max_position_embeddings,
                       max_shard_bytes=int(args.max_shard_gb * 1024 ** 3))
    out = convert(cc)
    print(f"converted {cc.src} -> {out}")
    return 0

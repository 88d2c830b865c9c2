"""Moved to llama_jax.fsutil (the one copy of the atomic-write helpers).

Transitional re-export for the modules that still import from here (demo_real.py,
stages/evaluate.py); delete this file once they import from llama_jax.fsutil.
"""

from __future__ import annotations

from ..fsutil import atomic_output_dir, use_default_mode, write_bytes_atomic, write_text_atomic

__all__ = ["atomic_output_dir", "use_default_mode", "write_bytes_atomic", "write_text_atomic"]

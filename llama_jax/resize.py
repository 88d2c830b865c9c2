"""Moved to llama_jax.vocab_resize (grow a model's embeddings to a merged tokenizer).

Transitional re-export for cli.py (`from .resize import cmd_resize`) and demo_real.py
(`from .resize import resize_embeddings`); delete this file once they import from
llama_jax.vocab_resize.
"""
from __future__ import annotations

from .vocab_resize import cmd_resize, resize_embeddings

__all__ = ["cmd_resize", "resize_embeddings"]

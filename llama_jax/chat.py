"""Moved to llama_jax.chat_cli (the `llama-jax chat` terminal app; chat *data* is llama_jax.data.chat).

Transitional re-export for cli.py (`__import__("llama_jax.chat", fromlist=["run_chat"])`); delete
this file once cli.py imports llama_jax.chat_cli.
"""
from __future__ import annotations

from .chat_cli import run_chat

__all__ = ["run_chat"]

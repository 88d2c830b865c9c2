"""Loading a tokenizer for generation: an HF tokenizer directory, or a bare sentencepiece model."""
from __future__ import annotations

from pathlib import Path


class SentencePieceTokenizer:
    """The two calls generation needs, over a sentencepiece model: BOS + pieces, as LLaMA-2."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = str(path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()

    def __call__(self, text: str) -> dict:
        return {"input_ids": [self.bos_token_id] + self.sp.encode(text)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if not self.sp.is_control(i)]
        return self.sp.decode(ids)

    def __len__(self):
        return self.sp.get_piece_size()


def load_tokenizer(path: str | Path):
    """HF tokenizer from a directory (local files only, never remote code), or a tokenizer.model."""
    p = Path(path)
    if p.is_file() and p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.is_dir() and ((p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists()):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    if p.is_dir() and (p / "tokenizer.model").exists():
        return SentencePieceTokenizer(p / "tokenizer.model")
    raise FileNotFoundError(f"{p}: no tokenizer (expected tokenizer.json / tokenizer_config.json or tokenizer.model)")


def encode(tok, text: str, special: bool = True) -> list[int]:
    """Token ids of `text`; special=True adds what the tokenizer adds by default (LLaMA: BOS), as
    `tokenizer.encode(text)` does in lm-eval's HF backend."""
    if isinstance(tok, SentencePieceTokenizer):
        return ([tok.bos_token_id] if special else []) + list(tok.sp.encode(text))
    return list(tok(text, add_special_tokens=special)["input_ids"])


def prefix_token(tok) -> int:
    """What a sequence is conditioned on when it has no context (lm-eval's prefix token): BOS, else EOS."""
    bos = getattr(tok, "bos_token_id", None)
    return bos if bos is not None else tok.eos_token_id

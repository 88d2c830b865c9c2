"""Compare a (merged) tokenizer with its base on text files."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from .chinese import has_chinese
from .corpus import CorpusStats, read_lines
from .dead_pieces import find_dead_pieces, find_unreachable_pieces
from .sp_model import BPE, as_processor, load_model_proto, resolve_model_path


@dataclasses.dataclass
class FileReport:
    path: str
    lines: int
    chars: int  # sum of len(line)
    base_tokens: int  # without BOS
    tokens: int
    non_chinese_lines: int  # lines without any Chinese character
    non_chinese_changed: int  # ... whose ids differ from the base tokenizer's
    roundtrip_ok: int  # lines with decode(encode(x)) == x
    base_roundtrip_ok: int
    invalid_utf8_lines: int
    hf_agree: int | None = None  # lines where the HF tokenizer gives the same ids (+BOS)

    @property
    def base_chars_per_token(self) -> float:
        return self.chars / self.base_tokens if self.base_tokens else float("nan")

    @property
    def chars_per_token(self) -> float:
        return self.chars / self.tokens if self.tokens else float("nan")


@dataclasses.dataclass
class TokenizerReport:
    tokenizer: str
    base: str
    vocab_size: int
    base_vocab_size: int
    files: list[FileReport]
    # None when the tokenizer is not BPE (dead pieces are a BPE notion).
    dead_pieces: list[tuple[int, str]] | None
    unreachable_pieces: list[tuple[int, str]] | None

    @property
    def non_chinese_lines(self) -> int:
        return sum(f.non_chinese_lines for f in self.files)

    @property
    def non_chinese_changed_share(self) -> float:
        total = self.non_chinese_lines
        return sum(f.non_chinese_changed for f in self.files) / total if total else 0.0

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for file_data, file in zip(data["files"], self.files):
            file_data["base_chars_per_token"] = file.base_chars_per_token
            file_data["chars_per_token"] = file.chars_per_token
        data["non_chinese_changed_share"] = self.non_chinese_changed_share
        data["dead_piece_count"] = None if self.dead_pieces is None else len(self.dead_pieces)
        data["unreachable_piece_count"] = None if self.unreachable_pieces is None else len(self.unreachable_pieces)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)


def _load_hf_tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer  # slow import, only for --check-hf

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def report_file(path, sp, base_sp, hf_tokenizer=None) -> FileReport:
    stats = CorpusStats()
    lines = read_lines(path, stats)
    ids = sp.encode(lines)
    base_ids = base_sp.encode(lines)
    non_chinese = [i for i, line in enumerate(lines) if not has_chinese(line)]
    report = FileReport(
        path=str(path),
        lines=len(lines),
        chars=sum(len(line) for line in lines),
        base_tokens=sum(len(x) for x in base_ids),
        tokens=sum(len(x) for x in ids),
        non_chinese_lines=len(non_chinese),
        non_chinese_changed=sum(ids[i] != base_ids[i] for i in non_chinese),
        roundtrip_ok=sum(text == back for text, back in zip(lines, sp.decode(ids))),
        base_roundtrip_ok=sum(text == back for text, back in zip(lines, base_sp.decode(base_ids))),
        invalid_utf8_lines=stats.invalid_utf8_lines,
    )
    if hf_tokenizer is not None:
        bos = [sp.bos_id()] if sp.bos_id() >= 0 else []
        hf_ids = hf_tokenizer(lines)["input_ids"]
        report.hf_agree = sum(bos + a == b for a, b in zip(ids, hf_ids))
    return report


def tokenizer_report(
    tokenizer: str | os.PathLike,
    base: str | os.PathLike,
    text_files: Sequence[str | os.PathLike],
    check_hf: bool = False,
) -> TokenizerReport:
    """TOKENIZER / BASE: a `.model` file or a directory with tokenizer.model.

    check_hf: also load TOKENIZER (a directory with HF files) with AutoTokenizer and count
    the lines on which it agrees with sentencepiece.
    """
    for path in text_files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such text file")
    proto = load_model_proto(tokenizer)
    base_proto = load_model_proto(base)
    sp, base_sp = as_processor(proto), as_processor(base_proto)
    hf_tokenizer = None
    if check_hf:
        hf_dir = Path(tokenizer)
        if not (hf_dir.is_dir() and (hf_dir / "tokenizer.json").is_file()):
            raise ValueError(f"{tokenizer}: --check-hf needs a directory with tokenizer.json")
        hf_tokenizer = _load_hf_tokenizer(hf_dir)
    is_bpe = proto.trainer_spec.model_type == BPE
    return TokenizerReport(
        tokenizer=str(resolve_model_path(tokenizer)),
        base=str(resolve_model_path(base)),
        vocab_size=len(proto.pieces),
        base_vocab_size=len(base_proto.pieces),
        files=[report_file(path, sp, base_sp, hf_tokenizer) for path in text_files],
        dead_pieces=find_dead_pieces(proto) if is_bpe else None,
        unreachable_pieces=find_unreachable_pieces(proto) if is_bpe else None,
    )


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.2f}%" if whole else "n/a"


def format_report(report: TokenizerReport, max_listed: int | None = None) -> str:
    """Markdown summary; dead pieces are listed in full unless max_listed is given."""
    out = [
        f"Tokenizer: {report.tokenizer} ({report.vocab_size} pieces)",
        f"Base: {report.base} ({report.base_vocab_size} pieces)",
        "",
        "| file | lines | chars | base tokens | tokens | base chars/token | chars/token "
        "| non-Chinese lines changed | round-trip ok | HF agrees |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for f in report.files:
        hf = "-" if f.hf_agree is None else _percent(f.hf_agree, f.lines)
        out.append(
            f"| {Path(f.path).name} | {f.lines} | {f.chars} | {f.base_tokens} | {f.tokens} "
            f"| {f.base_chars_per_token:.3f} | {f.chars_per_token:.3f} "
            f"| {f.non_chinese_changed}/{f.non_chinese_lines} | {_percent(f.roundtrip_ok, f.lines)} | {hf} |"
        )
    skipped = sum(f.invalid_utf8_lines for f in report.files)
    if skipped:
        out.append(f"\n{skipped} lines with invalid UTF-8 were skipped.")
    out.append("")
    changed = sum(f.non_chinese_changed for f in report.files)
    out.append(
        f"Non-Chinese lines whose encoding changed: {_percent(changed, report.non_chinese_lines)}"
        f" ({changed} of {report.non_chinese_lines})"
    )
    if report.dead_pieces is None:
        out.append("Dead pieces: n/a (not a BPE model)")
    else:
        listed = report.dead_pieces if max_listed is None else report.dead_pieces[:max_listed]
        out.append(
            f"Dead pieces (no split into two pieces): {len(report.dead_pieces)}; "
            f"unreachable (no chain of splits down to characters): {len(report.unreachable_pieces)}"
        )
        if listed:
            out.append("  " + " ".join(f"{i}:{piece}" for i, piece in listed))
            if len(listed) < len(report.dead_pieces):
                out.append(f"  ... and {len(report.dead_pieces) - len(listed)} more")
    return "\n".join(out)

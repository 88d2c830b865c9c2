"""Streaming text sources for training and reports (never the whole corpus in RAM)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

DATA_ENV_VAR = "LLAMA_JAX_DATA"


def default_data_dir() -> Path:
    """$LLAMA_JAX_DATA, else `../shared/data` next to the repository root."""
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]
    return (repo_root / ".." / "shared" / "data").resolve()


class EmptyCorpusError(ValueError):
    """No usable line of text was found in the given sources."""


@dataclasses.dataclass
class CorpusStats:
    """What the reader saw; bad input is counted rather than fatal."""

    sources: list[str] = dataclasses.field(default_factory=list)
    lines: int = 0  # lines/rows handed on
    chars: int = 0
    invalid_utf8_lines: int = 0
    empty_lines: int = 0
    missing_field_rows: int = 0  # dataset rows without a string in the text field
    too_long_lines: int = 0  # longer than the trainer's max_sentence_length

    def describe_sources(self) -> str:
        return ", ".join(self.sources) if self.sources else "(no sources)"

    def require_nonempty(self) -> None:
        if self.lines == 0:
            details = []
            if self.invalid_utf8_lines:
                details.append(f"{self.invalid_utf8_lines} invalid UTF-8 lines skipped")
            if self.too_long_lines:
                details.append(f"{self.too_long_lines} lines over max_sentence_length skipped")
            if self.missing_field_rows:
                details.append(f"{self.missing_field_rows} rows without the text field")
            extra = f" ({'; '.join(details)})" if details else ""
            raise EmptyCorpusError(f"empty corpus: no text lines in {self.describe_sources()}{extra}")


def iter_lines_of_file(path: str | os.PathLike, stats: CorpusStats) -> Iterator[str]:
    """Yield the non-empty lines of a UTF-8 file; lines that are not valid UTF-8 are skipped.

    The file is read in binary and split on b"\\n" only, so a stray byte costs one line
    and str.splitlines' extra separators (U+2028, \\x1c, ...) do not split lines.
    """
    stats.sources.append(str(path))
    with open(path, "rb") as f:
        for raw in f:
            raw = raw.rstrip(b"\r\n")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                stats.invalid_utf8_lines += 1
                continue
            if not line:
                stats.empty_lines += 1
                continue
            stats.lines += 1
            stats.chars += len(line)
            yield line


def iter_lines_of_files(paths: Iterable[str | os.PathLike], stats: CorpusStats) -> Iterator[str]:
    for path in paths:
        yield from iter_lines_of_file(path, stats)


def read_lines(path: str | os.PathLike, stats: CorpusStats | None = None) -> list[str]:
    """All non-empty, valid lines of one file (for held-out / report files, which are small)."""
    return list(iter_lines_of_file(path, stats if stats is not None else CorpusStats()))


_LOCAL_DATASET_BUILDERS = {
    ".txt": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


def iter_dataset_texts(
    name_or_path: str,
    text_field: str,
    stats: CorpusStats,
    split: str = "train",
    config_name: str | None = None,
) -> Iterator[str]:
    """Stream the `text_field` of a `datasets` dataset: a hub name, a local data file or a
    directory written by `save_to_disk`. Streaming keeps memory flat for large corpora."""
    import datasets  # heavy import, only needed for this source

    stats.sources.append(f"dataset {name_or_path}[{split}].{text_field}")
    path = Path(name_or_path)
    if path.is_file():
        builder = _LOCAL_DATASET_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{path}: unknown data file type {path.suffix!r}")
        rows = datasets.load_dataset(builder, data_files=str(path), split=split, streaming=True)
    elif path.is_dir() and (path / "dataset_info.json").is_file():
        rows = datasets.load_from_disk(str(path))  # memory-mapped Arrow, not loaded whole
        if isinstance(rows, datasets.DatasetDict):
            rows = rows[split]
    else:
        rows = datasets.load_dataset(name_or_path, config_name, split=split, streaming=True)
    for row in rows:
        text = row.get(text_field)
        if not isinstance(text, str):
            stats.missing_field_rows += 1
            continue
        # A row may hold a whole document; sentencepiece wants one sentence per item.
        for line in text.split("\n"):
            line = line.rstrip("\r")
            if not line:
                stats.empty_lines += 1
                continue
            stats.lines += 1
            stats.chars += len(line)
            yield line


def split_head_tail(lines: Sequence[str], head_fraction: float) -> tuple[list[str], list[str]]:
    """First `head_fraction` of the lines (floored) and the rest, e.g. train / held-out."""
    cut = int(len(lines) * head_fraction)
    return list(lines[:cut]), list(lines[cut:])

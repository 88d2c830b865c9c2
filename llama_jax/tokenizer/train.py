"""Train a sentencepiece BPE model whose pieces merge cleanly into LLaMA-2's tokenizer."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from .atomic import write_bytes_atomic
from .corpus import CorpusStats, iter_dataset_texts, iter_lines_of_files
from .sp_model import ModelProto

# Settings that must match LLaMA-2 (see its trainer_spec / normalizer_spec) so that the
# new pieces are written the same way as the base pieces: no normalization (the base
# uses "identity"), '▁' marks a space and a dummy prefix space starts each text,
# whitespace is kept verbatim, digits are single pieces.
LLAMA2_COMPATIBLE_SPEC = dict(
    model_type="bpe",
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    split_by_unicode_script=True,
    split_by_number=True,
    treat_whitespace_as_suffix=False,
    # The base model already falls back to bytes, the add-model only contributes pieces.
    byte_fallback=False,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    vocabulary_output_piece_score=True,
    hard_vocab_limit=True,
)


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    vocab_size: int = 20000
    character_coverage: float = 0.9995
    # Sentences sampled (reservoir) and shuffled when the corpus is larger than this.
    input_sentence_size: int = 1_000_000
    shuffle_input_sentence: bool = True
    # Bytes; longer lines are skipped (and counted). Chinese documents are often one long
    # line, so the sentencepiece default (4192) would silently drop much of a corpus.
    max_sentence_length: int = 1 << 16
    max_sentencepiece_length: int = 16
    split_by_whitespace: bool = True
    num_threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0
    # Any further sentencepiece trainer flags, passed through unchanged.
    extra: dict = dataclasses.field(default_factory=dict)

    def trainer_kwargs(self) -> dict:
        kwargs = dict(LLAMA2_COMPATIBLE_SPEC)
        kwargs.update(
            vocab_size=self.vocab_size,
            character_coverage=self.character_coverage,
            input_sentence_size=self.input_sentence_size,
            shuffle_input_sentence=self.shuffle_input_sentence,
            max_sentence_length=self.max_sentence_length,
            max_sentencepiece_length=self.max_sentencepiece_length,
            split_by_whitespace=self.split_by_whitespace,
            num_threads=self.num_threads,
            minloglevel=2,
        )
        kwargs.update(self.extra)
        return kwargs


@dataclasses.dataclass
class TrainResult:
    model_path: Path
    vocab_path: Path
    stats: CorpusStats
    seconds: float


class SentencePieceTrainingError(ValueError):
    """sentencepiece refused the corpus/options (e.g. vocab_size too large for the text)."""


def _limit_line_length(lines: Iterator[str], max_bytes: int, stats: CorpusStats) -> Iterator[str]:
    # sentencepiece would drop these too, but only log it; count them so callers can see.
    for line in lines:
        if len(line.encode("utf-8")) > max_bytes:
            stats.lines -= 1
            stats.chars -= len(line)
            stats.too_long_lines += 1
            continue
        yield line


def train_bpe(
    out_prefix: str | os.PathLike,
    *,
    input_files: Sequence[str | os.PathLike] = (),
    dataset: str | None = None,
    text_field: str = "text",
    dataset_split: str = "train",
    dataset_config: str | None = None,
    options: TrainOptions | None = None,
    **option_overrides,
) -> TrainResult:
    """Train on local files and/or a `datasets` dataset; write OUT_PREFIX.model/.vocab.

    Text is streamed to the trainer through `sentence_iterator`; with more than
    `input_sentence_size` lines sentencepiece keeps a random sample, so memory stays bounded.
    Raises EmptyCorpusError (a ValueError) when no usable line is found.
    """
    options = dataclasses.replace(options or TrainOptions(), **option_overrides)
    if not input_files and not dataset:
        raise ValueError("give input files and/or a dataset to train on")
    for path in input_files:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such input file")

    stats = CorpusStats()

    def all_lines() -> Iterator[str]:
        yield from iter_lines_of_files(input_files, stats)
        if dataset:
            yield from iter_dataset_texts(dataset, text_field, stats, dataset_split, dataset_config)

    # Look at the first line before starting the trainer so an empty corpus is reported
    # by name instead of as a sentencepiece internal error.
    lines = _limit_line_length(all_lines(), options.max_sentence_length, stats)
    first = next(lines, None)
    if first is None:
        stats.require_nonempty()

    def sentences() -> Iterator[str]:
        yield first
        yield from lines

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(options.seed)
    started = time.perf_counter()
    tmp_dir = tempfile.mkdtemp(prefix=".sp-train-", dir=out_prefix.parent)
    try:
        tmp_prefix = os.path.join(tmp_dir, "model")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(), model_prefix=tmp_prefix, **options.trainer_kwargs()
            )
        except RuntimeError as err:
            raise SentencePieceTrainingError(
                f"sentencepiece training on {stats.describe_sources()} failed: {err}"
            ) from err
        model_path = Path(f"{out_prefix}.model")
        vocab_path = Path(f"{out_prefix}.vocab")
        proto = ModelProto()
        proto.ParseFromString(Path(f"{tmp_prefix}.model").read_bytes())
        proto.trainer_spec.model_prefix = str(out_prefix)  # not the temp dir we trained in
        write_bytes_atomic(model_path, proto.SerializeToString())
        write_bytes_atomic(vocab_path, Path(f"{tmp_prefix}.vocab").read_bytes())
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    seconds = time.perf_counter() - started
    return TrainResult(model_path, vocab_path, stats, seconds)

"""Train a sentencepiece BPE model whose pieces merge cleanly into LLaMA-2's tokenizer."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import Counter
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from ..fsutil import write_bytes_atomic
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
    # sentencepiece refuses a vocab_size below the number of characters needed to reach
    # character_coverage (+3 meta pieces): "Vocabulary size is smaller than required_chars. 4000 vs
    # 4315" on the shared Chinese corpora.  True: count them first and raise vocab_size to fit (with
    # a notice; the demo does this); False: keep sentencepiece's error.
    raise_vocab_to_cover: bool = False
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
    vocab_size: int = 0        # what was trained (>= the requested size)
    notice: str | None = None  # set when vocab_size was raised to cover the corpus's characters


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


SP_META_PIECES = 3  # unk, bos, eos (pad is off in LLAMA2_COMPATIBLE_SPEC)


def required_vocab_size(lines: Iterator[str], character_coverage: float, max_lines: int) -> int:
    """The smallest vocab_size sentencepiece accepts for these lines: the most frequent characters
    that together reach `character_coverage` of all characters (a space counts as '▁', and each line
    gets the dummy-prefix '▁'), plus the meta pieces.  Counted over the first `max_lines` lines, as
    sentencepiece counts over its (sampled) input; a small margin is added by the caller."""
    counts: Counter = Counter()
    for i, line in enumerate(lines):
        if i >= max_lines:
            break
        counts.update(line)
        counts[" "] += 1
    total = sum(counts.values())
    if total == 0:
        return SP_META_PIECES
    covered, needed = 0, 0
    for _, c in counts.most_common():
        covered += c
        needed += 1
        if covered / total >= character_coverage:
            break
    return needed + SP_META_PIECES


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

    def all_lines(stats=stats) -> Iterator[str]:
        yield from iter_lines_of_files(input_files, stats)
        if dataset:
            yield from iter_dataset_texts(dataset, text_field, stats, dataset_split, dataset_config)

    notice = None
    if options.raise_vocab_to_cover:
        need = required_vocab_size(_limit_line_length(all_lines(CorpusStats()), options.max_sentence_length,
                                                      CorpusStats()),
                                   options.character_coverage, options.input_sentence_size)
        # margin: our count and sentencepiece's can differ by a few pieces (its own whitespace rules)
        need = need + max(8, math.ceil(need * 0.01))
        if need > options.vocab_size:
            notice = (f"vocab_size raised from {options.vocab_size} to {need}: the corpus needs {need} pieces to "
                      f"cover {options.character_coverage:g} of its characters, which sentencepiece requires")
            logging.getLogger(__name__).warning(notice)
            options = dataclasses.replace(options, vocab_size=need)

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
    return TrainResult(model_path, vocab_path, stats, seconds, options.vocab_size, notice)

"""`llama-jax tokenizer {train,merge,report}` subcommands.

Each subcommand's `func` takes the parsed args and returns an exit code: 0 on success,
2 for bad input (unreadable/empty corpus, wrong model type, missing file), with the
reason and file name on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

from .merge import DEAD_MODES, SCORE_MODES, MergeOptions, merge_tokenizers
from .report import format_report, tokenizer_report
from .train import TrainOptions, train_bpe

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def _run_reporting_errors(action, args) -> int:
    try:
        return action(args)
    except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _train(args: argparse.Namespace) -> int:
    if not args.input and not args.dataset:
        print("error: give --input FILE... and/or --dataset NAME_OR_PATH", file=sys.stderr)
        return EXIT_BAD_INPUT
    options = TrainOptions(
        vocab_size=args.vocab_size,
        character_coverage=args.character_coverage,
        input_sentence_size=args.input_sentence_size,
        max_sentence_length=args.max_sentence_length,
        max_sentencepiece_length=args.max_sentencepiece_length,
        num_threads=args.num_threads or (os.cpu_count() or 1),
        seed=args.seed,
        raise_vocab_to_cover=args.grow_vocab,
    )
    result = train_bpe(
        args.out,
        input_files=args.input or (),
        dataset=args.dataset,
        text_field=args.text_field,
        dataset_split=args.dataset_split,
        dataset_config=args.dataset_config,
        options=options,
    )
    s = result.stats
    print(f"trained on {s.lines} lines / {s.chars} chars in {result.seconds:.1f}s")
    if result.notice:
        print(f"note: {result.notice}")
    for count, what in (
        (s.invalid_utf8_lines, "lines with invalid UTF-8"),
        (s.too_long_lines, f"lines longer than {options.max_sentence_length} bytes"),
        (s.missing_field_rows, f"rows without a string field {args.text_field!r}"),
    ):
        if count:
            print(f"skipped {count} {what}")
    print(f"wrote {result.model_path} and {result.vocab_path}")
    return EXIT_OK


def _merge(args: argparse.Namespace) -> int:
    options = MergeOptions(
        pad_token=args.pad_token,
        pad_to_multiple_of=args.pad_to_multiple_of,
        repair_dead=args.repair_dead,
        new_piece_scores=args.new_piece_scores,
        keep_non_chinese_pieces=args.keep_non_chinese_pieces,
    )
    result = merge_tokenizers(args.base, args.add, args.out, options, add_words_file=args.add_words)
    print(result.summary())
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    report = tokenizer_report(args.tokenizer, args.base, args.text, check_hf=args.check_hf)
    print(report.to_json() if args.json else format_report(report))
    return EXIT_OK


def add_tokenizer_commands(subparsers) -> argparse.ArgumentParser:
    """Register `tokenizer train|merge|report` on an argparse subparsers object."""
    parser = subparsers.add_parser("tokenizer", help="train, merge and inspect Chinese tokenizers")
    commands = parser.add_subparsers(dest="tokenizer_command", metavar="{train,merge,report}", required=True)

    train = commands.add_parser("train", help="train a sentencepiece BPE model (LLaMA-2 compatible settings)")
    train.add_argument("--input", nargs="+", metavar="FILE", help="UTF-8 text files, one sentence/paragraph per line")
    train.add_argument("--dataset", metavar="NAME_OR_PATH",
                       help="datasets hub name, data file or save_to_disk dir (streamed)")
    train.add_argument("--text-field", default="text", help="dataset column with the text (default: text)")
    train.add_argument("--dataset-split", default="train")
    train.add_argument("--dataset-config", default=None, help="dataset configuration name")
    train.add_argument("--vocab-size", type=int, required=True,
                       help="pieces to train (sentencepiece refuses fewer than the corpus needs to cover its characters)")
    train.add_argument("--grow-vocab", action="store_true",
                       help="raise --vocab-size (with a note) when the corpus needs more pieces to cover its characters")
    train.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.model and PREFIX.vocab")
    defaults = TrainOptions()
    train.add_argument("--character-coverage", type=float, default=defaults.character_coverage)
    train.add_argument("--input-sentence-size", type=int, default=defaults.input_sentence_size,
                       help="sample at most this many lines (shuffled) from large corpora")
    train.add_argument("--max-sentence-length", type=int, default=defaults.max_sentence_length,
                       help="bytes; longer lines are skipped and counted")
    train.add_argument("--max-sentencepiece-length", type=int, default=defaults.max_sentencepiece_length)
    train.add_argument("--num-threads", type=int, default=0, help="default: all CPU cores")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.set_defaults(func=lambda args: _run_reporting_errors(_train, args))

    merge = commands.add_parser("merge", help="add new pieces to LLaMA-2's tokenizer, write it + HF files")
    merge.add_argument("--base", required=True, help="tokenizer.model (sentencepiece BPE) or HF dir containing it")
    merge.add_argument("--add", required=True, metavar="ZH.model", help="sentencepiece model whose pieces are added")
    merge.add_argument("--add-words", metavar="FILE", help="extra pieces, one per line")
    merge.add_argument("--pad-to-multiple-of", type=int, default=None, metavar="N",
                       help="append <reserved_k> control pieces up to a multiple of N (e.g. 64)")
    merge.add_argument("--pad-token", action="store_true", help="add <pad> right after the base pieces")
    merge.add_argument("--repair-dead", choices=DEAD_MODES, default="repair",
                       help="pieces BPE cannot produce: add intermediates (repair), drop them, or keep them")
    merge.add_argument("--new-piece-scores", choices=SCORE_MODES, default="below-base",
                       help="below-base keeps LLaMA-2 merges first and HF exact; zero is the Chinese-LLaMA style")
    merge.add_argument("--keep-non-chinese-pieces", action="store_true",
                       help="also add pieces without a Chinese character (may change English tokenization)")
    merge.add_argument("--out", required=True, metavar="DIR")
    merge.set_defaults(func=lambda args: _run_reporting_errors(_merge, args))

    report = commands.add_parser("report", help="chars/token, changed non-Chinese lines, dead pieces, round trip")
    report.add_argument("--tokenizer", required=True, metavar="DIR_OR_MODEL")
    report.add_argument("--base", required=True, metavar="BASE")
    report.add_argument("--text", nargs="+", required=True, metavar="FILE")
    report.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    report.add_argument("--check-hf", action="store_true",
                        help="also compare the HF tokenizer in DIR with sentencepiece")
    report.set_defaults(func=lambda args: _run_reporting_errors(_report, args))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: `python -m llama_jax.tokenizer.cli tokenizer train ...`."""
    parser = argparse.ArgumentParser(prog="llama-jax")
    add_tokenizer_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

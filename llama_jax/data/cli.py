"""`llama-jax data tokenize` (text -> token shards) and `llama-jax data clean` (SFT / text cleaning)."""
from __future__ import annotations

import json


# The commands' modules load on use: `llama-jax --help` registers these commands and stays light.
def _cmd_tokenize(args) -> int:
    from .shards import TokenizeConfig, tokenize_corpus

    m = tokenize_corpus(args.input, args.tokenizer, args.out, TokenizeConfig(
        text_field=args.text_field, num_proc=args.num_proc, chunk_mb=args.chunk_mb, on_bad_utf8=args.on_bad_utf8),
        progress=not args.no_progress)
    c = m["counts"]
    print(f"{args.out}: {c['docs']} documents, {c['tokens']} tokens ({m['dtype']}) in {len(m['shards'])} shard(s) "
          f"from {c['bytes'] / 2**20:.1f} MiB of text; {c.get('bad_utf8_lines', 0)} invalid UTF-8 line(s) skipped, "
          f"{c.get('empty_lines', 0)} empty")
    for e in m.get("bad_utf8_examples", []):
        print(f"  skipped: {e}")
    return 0


def _cmd_clean(args) -> int:
    from .clean import CleanConfig, clean, format_table

    cfg = CleanConfig(format=args.format, text_field=args.text_field, near_dup_threshold=args.near_dup_threshold,
                      min_response_chars=args.min_response_chars, max_chars=args.max_chars, lang=args.lang,
                      to_simplified=args.to_simplified, mask_pii=args.mask_pii, keep=args.keep,
                      refusal_file=args.refusal_patterns, progress=not args.no_progress)
    for rule in args.disable or []:
        attr = {"exact_dup": "exact_dup", "prompt_dup": "prompt_dup", "near_dup": "near_dup", "refusal": "refusal",
                "repetition": "repetition", "truncated_response": "truncated", "fix_text": "fix_text",
                "repeats_instruction": "repeats_instruction"}.get(rule)
        if attr is None:
            raise ValueError(f"--disable {rule}: unknown rule (exact_dup, prompt_dup, near_dup, refusal, repetition, "
                             "truncated_response, repeats_instruction, fix_text; thresholds: set them to 0)")
        setattr(cfg, attr, False)
    report = clean(args.input, args.out, cfg, args.report)
    print(format_table(report))
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    return 0


def add_data_commands(sub) -> None:
    d = sub.add_parser("data", help="data tools: tokenize text into shards, clean SFT / pretraining data")
    dsub = d.add_subparsers(dest="data_command", required=True)
    t = dsub.add_parser("tokenize", help="text files -> on-disk token shards (uint16/uint32) + index + manifest")
    t.add_argument("--tokenizer", required=True, help="tokenizer.model or HF tokenizer directory")
    t.add_argument("--input", required=True, nargs="+", help="txt / jsonl / parquet files or globs (.gz, .zst ok)")
    t.add_argument("--out", required=True, help="output directory (rerunning resumes)")
    t.add_argument("--num-proc", type=int, default=1)
    t.add_argument("--text-field", default="text", help="field of jsonl / parquet records (default text)")
    t.add_argument("--chunk-mb", type=float, default=64.0, help="work unit of an uncompressed file (default 64)")
    t.add_argument("--on-bad-utf8", choices=["skip", "error"], default="skip")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_tokenize)

    c = dsub.add_parser("clean", help="clean SFT (alpaca / sharegpt / messages) or text records; report per rule")
    c.add_argument("input", nargs="+", help="json / jsonl / txt files or globs")
    c.add_argument("--out", required=True, help="directory for the kept records (same file names and format)")
    c.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "text"])
    c.add_argument("--text-field", default="text")
    c.add_argument("--near-dup-threshold", type=float, default=0.5,
                   help="MinHash Jaccard of character 3-grams (default 0.5: a 10%% edit gives 0.54-0.6)")
    c.add_argument("--min-response-chars", type=int, default=1, help="0 = off (default 1: empty responses)")
    c.add_argument("--max-chars", type=int, default=16000, help="0 = off")
    c.add_argument("--lang", default=None, choices=["zh"], help="require a CJK share (zh)")
    c.add_argument("--to-simplified", action="store_true", help="OpenCC Traditional -> Simplified")
    c.add_argument("--mask-pii", action="store_true", help="mask e-mail addresses and phone numbers")
    c.add_argument("--keep", choices=["first", "longest"], default="first", help="which prompt duplicate to keep")
    c.add_argument("--refusal-patterns", default=None, metavar="FILE", help="extra refusal regexes, one per line")
    c.add_argument("--disable", action="append", metavar="RULE", help="switch a rule off (repeatable)")
    c.add_argument("--report", default=None, help="report path (default OUT/clean_report.json)")
    c.add_argument("--json", action="store_true", help="also print the report as JSON")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=_cmd_clean)

"""`llama-jax eval`: perplexity / bits per character of text files and C-Eval / CMMLU / MMLU accuracy.

Contract
- The model (HF dir or llama_jax checkpoint, optionally + a PEFT LoRA adapter, merged) is loaded
  onto the mesh (default: every device on fsdp) like every other command; rows are split over
  the mesh's (data, fsdp) axes.
- ppl: each file (txt: the whole file; jsonl / json: the records' text field joined by a blank
  line) is one token sequence after a prefix token (BOS, else EOS), scored with sliding windows
  (`max_length`, `stride`, each token once: `llama_jax.scoring`).  Per file: tokens, characters,
  summed NLL, loss, perplexity and bits per character.
- ceval / cmmlu / mmlu: prompts, few-shot rows and " A".." D" continuations as lm-eval's
  ceval-valid / cmmlu / mmlu tasks (`llama_jax.data.multiple_choice`); tokenised as lm-eval's HF
  backend does (context and context + continuation encoded with the tokenizer's defaults, the
  continuation = the tokens after the context's); prediction = argmax log-likelihood (first on
  ties, as numpy).  Per subject: n, correct, acc and every question's prediction and choice
  log-likelihoods; per task: micro (over questions) and macro (over subjects) accuracy.
- Results go to stdout as a table and, with `out`, to a JSON file written atomically.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.multiple_choice import CONTINUATIONS, FORMATS, load_subjects, prompt
from ..data.sources import DataError
from ..text import encode, prefix_token
from ..fsutil import write_text_atomic

MC_TASKS = ("ceval", "cmmlu", "mmlu")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


@dataclass
class EvalConfig:
    model: str
    tasks: list = field(default_factory=lambda: ["ppl"])
    data: list = field(default_factory=list)       # PATH or task=PATH
    adapter: str | None = None
    tokenizer: str | None = None
    shots: int = 0
    subjects: list | None = None
    limit: int | None = None
    batch_size: int = 8
    max_length: int | None = None
    stride: int | None = None
    dtype: str | None = None
    mesh: dict = field(default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
    text_field: str = "text"
    out: str | None = None
    progress: bool = True


# The CLI registers `llama-jax eval` from this module (add_eval_command), so `llama-jax --help`
# imports it: what pulls in jax / flax / lm_eval is imported in the functions that run an eval.
def default_data(task: str) -> Path | None:
    from ..tokenizer.corpus import default_data_dir

    d = default_data_dir() / "benchmarks"
    return {"ceval": d / "ceval" / "ceval-exam.zip", "cmmlu": d / "cmmlu"}.get(task)


def route_data(tasks: list[str], data: list[str]) -> dict[str, list[str]]:
    """--data entries per task: 'task=PATH', else text files to ppl and the rest to the one MC task."""
    routed: dict[str, list[str]] = {t: [] for t in tasks}
    mc = [t for t in tasks if t in MC_TASKS]
    for d in data:
        task, _, p = d.partition("=") if "=" in d and d.split("=", 1)[0] in (*MC_TASKS, "ppl") else ("", "", d)
        if not task:
            if Path(p).suffix in TEXT_SUFFIXES:
                task = "ppl"
            elif len(mc) == 1:
                task = mc[0]
            else:
                raise DataError(f"--data {p}: say which task it is for (e.g. --data cmmlu={p})")
        if task not in routed:
            raise DataError(f"--data {d}: task {task!r} is not in --tasks {','.join(tasks)}")
        routed[task].append(p)
    return routed


# ----------------------------------------------------------------------------- text files
def read_text_file(path: str | Path, text_field: str = "text", limit: int | None = None) -> str:
    """The text of one file: .txt as is (limit: first N lines), .jsonl / .json records' field joined by
    a blank line (limit: first N records)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: text file not found")
    if p.suffix not in TEXT_SUFFIXES:
        raise DataError(f"{p}: unsupported text file type (expected {', '.join(TEXT_SUFFIXES)})")
    raw = p.read_text(encoding="utf-8")
    if p.suffix == ".txt":
        text = "".join(raw.splitlines(keepends=True)[:limit]) if limit else raw
    else:
        if p.suffix == ".jsonl":
            records = []
            for i, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        records.append((i, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{p}: line {i}: invalid JSON ({e.msg})") from None
        else:
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None
            if not isinstance(data, list):
                raise DataError(f"{p}: expected a JSON array of records")
            records = list(enumerate(data))
        texts = []
        for i, r in records[:limit] if limit else records:
            if not isinstance(r, dict) or not isinstance(r.get(text_field), str):
                what = "line" if p.suffix == ".jsonl" else "record"
                raise DataError(f"{p}: {what} {i}: no string field '{text_field}'")
            texts.append(r[text_field])
        text = "\n\n".join(texts)
    if not text.strip():
        raise DataError(f"{p}: no text")
    return text


# ----------------------------------------------------------------------------- tasks
def _bar(total, desc, unit, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=not enabled)


def load_ppl(files: list[str], cfg: EvalConfig) -> dict:
    if not files:
        raise DataError("ppl: give the text files with --data PATH (.txt, .jsonl or .json)")
    return {f: read_text_file(f, cfg.text_field, cfg.limit) for f in files}


def eval_ppl(scorer, tok, texts: dict, cfg: EvalConfig) -> dict:
    files = list(texts)
    ids = {f: encode(tok, t, special=False) for f, t in texts.items()}
    from ..scoring import lm_measures, sliding_windows

    L = int(cfg.max_length or scorer.max_length)
    S = int(cfg.stride or L)
    total = sum(len(sliding_windows(len(v) + 1, L, S)) for v in ids.values())
    out = {"max_length": L, "stride": S, "files": {}}
    t0 = time.perf_counter()
    with _bar(total, "ppl", "window", cfg.progress) as bar:
        def progress(n, toks):
            bar.update(n)
            bar.set_postfix({"tok/s": f"{scorer.tokens_done / max(time.perf_counter() - t0, 1e-9):.0f}"}, refresh=False)
        for f in files:
            nll, n = scorer.perplexity(ids[f], prefix_token(tok), L, S, progress=progress)
            chars = len(texts[f])
            out["files"][f] = {"tokens": n, "chars": chars, "nll": nll, **lm_measures(nll, n, chars)}
    out["seconds"] = time.perf_counter() - t0
    return out


def mc_requests(tok, ctx: str, vocab_size: int, where: str):
    """lm-eval's (context ids, continuation ids) for the four choices of one question, checked."""
    ctx_enc = encode(tok, ctx)
    reqs = []
    unk = getattr(tok, "unk_token_id", None)
    for c in CONTINUATIONS:
        whole = encode(tok, ctx + c)
        cont = whole[len(ctx_enc):]
        if not cont:
            raise DataError(f"{where}: the tokenizer gives no token for the choice {c!r}")
        bad = [t for t in cont if t >= vocab_size or t < 0 or (unk is not None and t == unk)]
        if bad:
            why = (f"id {bad[0]} is outside the model's vocabulary of {vocab_size}" if bad[0] >= vocab_size
                   else f"it is the unknown token (id {bad[0]})")
            raise DataError(f"{where}: the choice {c!r} has no token in this model's vocabulary: {why}")
        reqs.append((ctx_enc, cont))
    if len({tuple(r[1]) for r in reqs}) < len(reqs):
        raise DataError(f"{where}: the choices {', '.join(map(repr, CONTINUATIONS))} encode to the same tokens")
    if max(ctx_enc, default=0) >= vocab_size:
        raise DataError(f"{where}: the prompt has token id {max(ctx_enc)}, outside the model's vocabulary "
                        f"of {vocab_size} (tokenizer and model do not match)")
    return reqs


def load_mc(task: str, paths: list[str], cfg: EvalConfig):
    """(subjects, data paths) of a multiple-choice task: read and checked before any model loads."""
    if not paths:
        d = default_data(task)
        if d is None or not d.exists():
            raise DataError(f"{task}: no data given (--data {task}=PATH: a directory or zip in the {task} layout)")
        paths = [str(d)]
    subjects = []
    for p in paths:
        subjects += load_subjects(task, p, cfg.subjects, cfg.shots, cfg.limit)
    return subjects, paths


def eval_mc(scorer, tok, task: str, subjects, paths: list[str], cfg: EvalConfig, vocab_size: int) -> dict:
    fmt = FORMATS[task]
    n_q = sum(len(s.questions) for s in subjects)
    out = {"shots": cfg.shots, "data": paths, "subjects": {}}
    t0 = time.perf_counter()
    with _bar(n_q, task, "q", cfg.progress) as bar:
        def progress(n, toks):
            bar.update(n // len(CONTINUATIONS))
            el = max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix({"q/s": f"{bar.n / el:.2f}", "tok/s": f"{scorer.tokens_done / el:.0f}"}, refresh=False)
        # every question of every subject in one call: rows are sorted by length across subjects, so
        # batches are full and few shapes compile
        reqs = [r for s in subjects for q in s.questions for r in mc_requests(tok, prompt(q, s, fmt), vocab_size,
                                                                                   q.where)]
        res = iter(scorer.loglikelihood(reqs, progress=progress))
        for s in subjects:
            lls = np.array([next(res)[0] for _ in range(len(s.questions) * len(CONTINUATIONS))],
                           np.float64).reshape(len(s.questions), len(CONTINUATIONS))
            preds = lls.argmax(axis=1)
            gold = np.array([q.answer for q in s.questions])
            correct = int((preds == gold).sum())
            out["subjects"][s.name] = {"n": len(s.questions), "correct": correct, "acc": correct / len(s.questions),
                                       "predictions": preds.tolist(), "answers": gold.tolist(),
                                       "loglikelihoods": lls.round(6).tolist()}
    secs = time.perf_counter() - t0
    per = out["subjects"].values()
    out.update(n=n_q, correct=sum(v["correct"] for v in per), seconds=secs, questions_per_sec=n_q / max(secs, 1e-9))
    out["acc_micro"] = out["correct"] / max(n_q, 1)
    out["acc_macro"] = float(np.mean([v["acc"] for v in per])) if per else 0.0
    return out


# ----------------------------------------------------------------------------- driver
def load_model(cfg: EvalConfig):
    import llama_jax
    from ..sharding import make_mesh
    from ..text import load_tokenizer

    mesh = make_mesh(cfg.mesh)
    model = llama_jax.load(cfg.model, dtype=cfg.dtype, mesh=mesh)
    if cfg.adapter:
        from ..lora import load_peft, merge

        merge(load_peft(model, cfg.adapter))
    tok_path = cfg.tokenizer or cfg.model
    tok = load_tokenizer(tok_path)
    return model, tok, mesh


def run_eval(cfg: EvalConfig, model=None, tok=None, mesh=None) -> dict:
    from ..scoring import Scorer

    unknown = [t for t in cfg.tasks if t not in ("ppl", *MC_TASKS)]
    if unknown:
        raise DataError(f"--tasks: unknown task(s) {', '.join(unknown)} (known: ppl, {', '.join(MC_TASKS)})")
    if cfg.shots < 0:
        raise DataError("--shots must be >= 0")
    routed = route_data(cfg.tasks, cfg.data)
    data = {t: load_ppl(routed[t], cfg) if t == "ppl" else load_mc(t, routed[t], cfg) for t in cfg.tasks}
    if model is None:
        model, tok, mesh = load_model(cfg)
    scorer = Scorer(model, batch_size=cfg.batch_size, max_length=cfg.max_length, mesh=mesh)
    results = {"model": str(cfg.model), "adapter": cfg.adapter, "dtype": model.config.dtype,
               "max_length": scorer.max_length, "batch_size": scorer.batch_size, "tasks": {}}
    for t in cfg.tasks:
        if t == "ppl":
            results["tasks"][t] = eval_ppl(scorer, tok, data[t], cfg)
        else:
            results["tasks"][t] = eval_mc(scorer, tok, t, *data[t], cfg, model.config.vocab_size)
    if cfg.out:
        write_json_atomic(cfg.out, results)
    return results


def write_json_atomic(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1, default=str) + "\n")


def summary(results: dict) -> str:
    lines = []
    for t, r in results["tasks"].items():
        if t == "ppl":
            lines.append(f"{'file':<48} {'tokens':>9} {'chars':>9} {'loss':>8} {'ppl':>10} {'bits/char':>9}")
            for f, v in r["files"].items():
                name = f if len(f) <= 48 else "..." + f[-45:]
                lines.append(f"{name:<48} {v['tokens']:>9} {v['chars']:>9} {v['loss']:>8.4f} {v['ppl']:>10.3f} "
                             f"{v['bpc']:>9.4f}")
        else:
            subs = r["subjects"]
            lines.append(f"{t} ({r['shots']}-shot): {r['n']} questions, {len(subs)} subjects, "
                         f"acc {r['acc_micro']:.4f} (micro) {r['acc_macro']:.4f} (macro), "
                         f"{r['questions_per_sec']:.2f} questions/s")
            if len(subs) <= 12:
                for s, v in subs.items():
                    lines.append(f"  {s:<44} {v['n']:>5} {v['acc']:>8.4f}")
    return "\n".join(lines)


def run_lm_eval(args) -> dict:
    """`llama-jax eval --lm-eval TASKS`: lm-eval's own tasks through the llama_jax model class."""
    from .. import lm_eval_adapter  # the adapter sits above this module: imported on use only

    return lm_eval_adapter.run_tasks(
        model=args.model, tasks=args.lm_eval.split(","), include_path=args.include_path, shots=args.shots,
        limit=args.limit, batch_size=args.batch_size, dtype=args.dtype, adapter=args.adapter,
        max_length=args.max_length, out=args.out)


def cmd_eval(args) -> int:
    if args.lm_eval:
        res = run_lm_eval(args)
        print(res["table"])
        return 0
    if args.write_lm_eval_tasks:
        from ..lm_eval_adapter import write_local_tasks

        d = write_local_tasks(args.write_lm_eval_tasks)
        print(f"lm-eval task YAMLs written to {d} (use --include-path {d})")
        return 0
    if not args.model:
        raise DataError("--model is required")
    mesh = dict(zip(("data", "fsdp", "tensor"), (1, -1, 1)))
    if args.mesh:
        from ..sharding import parse_mesh  # imported on use: jax stays out of `llama-jax --help`

        mesh = parse_mesh(args.mesh)
    cfg = EvalConfig(model=args.model, tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
                     data=args.data or [], adapter=args.adapter, tokenizer=args.tokenizer, shots=args.shots,
                     subjects=args.subjects, limit=args.limit, batch_size=args.batch_size,
                     max_length=args.max_length, stride=args.stride, dtype=args.dtype, mesh=mesh, out=args.out)
    res = run_eval(cfg)
    print(summary(res))
    if cfg.out:
        print(f"results written to {cfg.out}")
    return 0


def add_eval_command(sub) -> None:
    e = sub.add_parser("eval", help="perplexity / bits per char of text files; C-Eval, CMMLU, MMLU accuracy; "
                                    "lm-eval tasks through the llama_jax model")
    e.add_argument("--model", help="HF Llama directory or llama_jax checkpoint")
    e.add_argument("--adapter", default=None, help="PEFT LoRA adapter directory (merged into the model)")
    e.add_argument("--tokenizer", default=None, help="tokenizer dir / tokenizer.model (default: the model dir)")
    e.add_argument("--tasks", default="ppl", help="comma list of ppl, ceval, cmmlu, mmlu (default ppl)")
    e.add_argument("--data", action="append", metavar="[TASK=]PATH",
                   help="text files for ppl (.txt/.jsonl/.json); a dir, zip or CSV for a multiple-choice task "
                        "(default: the shared data's C-Eval zip / CMMLU dir); repeatable")
    e.add_argument("--shots", type=int, default=0, help="few-shot examples: the first K dev rows (default 0)")
    e.add_argument("--subjects", nargs="+", default=None, help="only these subjects")
    e.add_argument("--limit", type=int, default=None,
                   help="first N questions per subject / lines or records per text file / docs per lm-eval task")
    e.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    e.add_argument("--max-length", type=int, default=None,
                   help="longest row (default: the model's max_position_embeddings); ppl window length")
    e.add_argument("--stride", type=int, default=None, help="ppl window stride (default: max-length)")
    e.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: the checkpoint's)")
    e.add_argument("--mesh", default=None, help="e.g. data=1,fsdp=-1,tensor=1 (default: all devices on fsdp)")
    e.add_argument("--out", default=None, help="results JSON (written atomically)")
    e.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="run these lm-evaluation-harness tasks through the llama_jax model instead")
    e.add_argument("--include-path", default=None,
                   help="extra lm-eval task YAMLs (default with --lm-eval: the local C-Eval / CMMLU tasks, "
                        "ceval-valid_local and cmmlu_local, written on the fly)")
    e.add_argument("--write-lm-eval-tasks", default=None, metavar="DIR",
                   help="write the local C-Eval / CMMLU lm-eval task YAMLs to DIR and exit")
    e.set_defaults(func=cmd_eval)

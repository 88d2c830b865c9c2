"""`llama-jax data clean`: rule-based cleaning of SFT records (alpaca / sharegpt / messages) and
pretraining text, streamed, deterministic, every rule switchable and counted.

Contract
--------
`clean(inputs, out_dir, CleanConfig)` reads each input file record by record (`chat.read_records`
for json/jsonl, lines for .txt), writes the kept records to `out_dir/<file name>` in the input's
format (JSON array stays an array, JSON Lines stay lines, text stays lines; written to a temp name
and renamed), and returns a report (also written as JSON): records in / out per file and per rule,
records modified per fix, and a few removed examples per rule.  Same input and options -> the same
output, byte for byte (no randomness except MinHash's fixed seed; records are visited in input order
and the first of a duplicate group is kept).

Order of the rules (a record is counted under the first rule that removes it):

 fixes (modify, never remove): control characters stripped; mojibake repaired with
   `ftfy.fix_encoding` (only the encoding: quotes, widths and ligatures are left alone);
   Traditional -> Simplified with OpenCC `t2s` (`to_simplified`); e-mail / phone masking (`mask_pii`).
 1. invalid_record      unparsable JSON or not an alpaca / sharegpt / messages record (records.py's parser)
 2. broken_text         U+FFFD replacement characters or mojibake ftfy could not repair
 3. exact_dup           same record after normalisation (NFKC, CJK punctuation -> ASCII, whitespace, case)
 4. empty_response      an assistant turn empty or shorter than `min_response_chars` (text: the document)
 5. repeats_instruction the response only repeats the prompt
 6. truncated_response  a long response that ends mid-sentence (no closing punctuation / symbol / digit)
 7. too_long            more than `max_chars` characters in the record
 8. language            share of CJK among letters below `min_cjk_share` (with `lang="zh"`)
 9. repetition          degenerate text: share of repeated character n-grams or duplicated lines
10. refusal             boilerplate / refusal patterns (REFUSAL_PATTERNS + a user file of regexes)
11. prompt_dup          same prompt (all user turns) as a kept record: keep the first, or the longest
                        response (`keep="longest"`: a first pass finds it; the input is read twice)
12. near_dup            MinHash LSH (datasketch) over character n-grams of the normalised record,
                        estimated Jaccard >= `near_dup_threshold` with a kept record

Memory: the exact / prompt keys are 8-byte digests; the LSH keeps one MinHash band signature per kept
record (num_perm x 8 bytes, ~1 KiB at 128): 10^6 kept records ~ 1 GB.  Nothing else is held.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import unicodedata
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .records import ASSISTANT, USER, RecordError, read_records, to_conversation
from .sources import DataError, expand

# Refusals and AI boilerplate common in distilled Chinese SFT sets (ChatGPT / GPT-4 answers).  Python
# regexes, searched in every assistant turn; extend with `refusal_file` (one regex per line, # comments).
REFUSAL_PATTERNS = [
    r"作为一个?(AI|人工智能|ai)(语言)?(模型|助手|程序)",
    r"作为一[个名](AI|人工智能)",
    r"我(只)?是一个?(AI|人工智能)(语言)?(模型|助手|程序)",
    r"我是由OpenAI(训练|开发)",
    r"^(很抱歉|抱歉|对不起)?[，,]?\s*我(无法|不能)(提供|回答|完成|满足|帮助|为您|给出|生成|执行|进行)",
    r"(?i)as an ai (language )?model",
    r"(?i)^i'?m sorry,? but i (can(no|')t|am unable)",
    r"(?i)^i (cannot|can't|am unable to) (fulfill|provide|help|assist|comply)",
]

RULES = ["invalid_record", "broken_text", "exact_dup", "empty_response", "repeats_instruction",
         "truncated_response", "too_long", "language", "repetition", "refusal", "prompt_dup", "near_dup"]
FIXES = ["control_chars", "mojibake_fixed", "to_simplified", "masked_email", "masked_phone"]


@dataclass
class CleanConfig:
    """Options of `llama-jax data clean`; a rule is off when its switch is False (or threshold 0)."""
    format: str = "auto"                 # auto | alpaca | sharegpt | text
    text_field: str = "text"             # text format in jsonl
    exact_dup: bool = True
    prompt_dup: bool = True
    keep: str = "first"                  # first | longest (prompt duplicates)
    near_dup: bool = True
    near_dup_threshold: float = 0.5      # Jaccard of character 3-grams; docs/data.md: why not 0.85
    near_dup_ngram: int = 3
    num_perm: int = 128
    min_response_chars: int = 1          # 0 = off
    repeats_instruction: bool = True
    truncated: bool = True
    truncated_min_chars: int = 100       # shorter responses may end without punctuation (a name, a number)
    max_chars: int = 16000               # 0 = off
    lang: str | None = None              # zh: require a CJK share
    min_cjk_share: float = 0.3
    repetition: bool = True
    rep_ngram: int = 10
    max_rep_ngram_share: float = 0.5
    max_dup_line_share: float = 0.5
    refusal: bool = True
    refusal_file: str | None = None
    fix_text: bool = True                # control chars + mojibake
    to_simplified: bool = False
    mask_pii: bool = False
    examples: int = 3
    progress: bool = True


# ----------------------------------------------------------------------------- text helpers

_PUNCT = str.maketrans({"。": ".", "、": ",", "，": ",", "；": ";", "：": ":", "？": "?", "！": "!", "「": '"', "」": '"',
                        "『": '"', "』": '"', "“": '"', "”": '"', "‘": "'", "’": "'", "（": "(", "）": ")",
                        "【": "[", "】": "]", "《": "<", "》": ">", "～": "~", "…": "...", "—": "-"})
_WS = re.compile(r"\s+")
_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_MOJI_HINT = re.compile(r"[\u00c0-\u00ff][\u0080-\u00bf\u2010-\u203a\u0152-\u0192\u02c6-\u02dc]")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_PHONE = re.compile(r"(?<!\d)(?:\+?86[- ]?)?1[3-9]\d{9}(?!\d)|(?<!\d)\+\d{1,3}[- ]?\d{2,4}[- ]?\d{3,4}[- ]?\d{3,4}(?!\d)")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


def normalize(text: str) -> str:
    """Dedup key text: NFKC, CJK punctuation -> ASCII, whitespace collapsed, case folded."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).translate(_PUNCT)).strip().casefold()


def _digest(s: str) -> bytes:
    return hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest()


def _ends_sentence(text: str) -> bool:
    t = text.rstrip()
    if not t:
        return True
    c = t[-1]
    cat = unicodedata.category(c)
    return cat[0] in "PSN" or c in "\u3002\uff01\uff1f"  # punctuation, symbol (emoji, `), digit


def _rep_share(text: str, n: int) -> float:
    """Share of character n-gram positions whose n-gram already occurred (0 = no repetition)."""
    t = _WS.sub(" ", text)
    m = len(t) - n + 1
    if m <= 0:
        return 0.0
    seen = set()
    rep = 0
    for i in range(m):
        g = t[i:i + n]
        if g in seen:
            rep += 1
        else:
            seen.add(g)
    return rep / m


def _dup_line_share(text: str) -> float:
    lines = [l.strip() for l in text.split("\n") if l.strip()]
    if len(lines) < 4:
        return 0.0
    c = Counter(lines)
    dup = sum(len(l) * (k - 1) for l, k in c.items() if k > 1)
    return dup / max(1, sum(len(l) for l in lines))


# ----------------------------------------------------------------------------- records

def detect_format(rec) -> str:
    if isinstance(rec, str):
        return "text"
    if isinstance(rec, dict):
        if "conversations" in rec or "messages" in rec:
            return "sharegpt"
        if "instruction" in rec:
            return "alpaca"
    return "text"


def _map_record(rec, fmt: str, fn, text_field: str):
    """The record with fn applied to every text field (alpaca: instruction/input/output/system/history;
    sharegpt: every message's value/content and system; text: the string or its text field)."""
    if isinstance(rec, str):
        return fn(rec)
    rec = dict(rec)
    if fmt == "text":
        if isinstance(rec.get(text_field), str):
            rec[text_field] = fn(rec[text_field])
        return rec
    for k in ("instruction", "input", "output", "system"):
        if isinstance(rec.get(k), str):
            rec[k] = fn(rec[k])
    if isinstance(rec.get("history"), list):
        rec["history"] = [[fn(x) if isinstance(x, str) else x for x in pair] if isinstance(pair, list) else pair
                          for pair in rec["history"]]
    for key in ("conversations", "messages"):
        if isinstance(rec.get(key), list):
            msgs = []
            for m in rec[key]:
                if isinstance(m, dict):
                    m = {k: fn(v) if k in ("value", "content") and isinstance(v, str) else v for k, v in m.items()}
                msgs.append(m)
            rec[key] = msgs
    return rec


@dataclass
class _Rec:
    source: str
    where: str
    rec: object
    fmt: str
    prompts: list = field(default_factory=list)
    responses: list = field(default_factory=list)
    all_text: str = ""


class Cleaner:
    def __init__(self, cfg: CleanConfig):
        self.cfg = cfg
        pats = list(REFUSAL_PATTERNS)
        if cfg.refusal_file:
            for i, line in enumerate(Path(cfg.refusal_file).read_text(encoding="utf-8").splitlines(), 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    try:
                        re.compile(line.strip())
                    except re.error as e:
                        raise DataError(f"{cfg.refusal_file}: line {i}: not a valid regex ({e})") from None
                    pats.append(line.strip())
        self.refusal = [re.compile(p, re.M) for p in pats]
        self.t2s = None
        if cfg.to_simplified:
            import opencc

            self.t2s = opencc.OpenCC("t2s")
        self.reset()

    def reset(self):
        from datasketch import MinHashLSH

        self.exact: set = set()
        self.prompts: set = set()
        # candidates from an LSH tuned 0.1 below the threshold, confirmed by the estimated Jaccard: datasketch's
        # bands for 0.5 (b=25, r=5) find a pair at J=0.55 with p=0.73 only; for 0.4 (b=32, r=4) p=0.95
        self.lsh = MinHashLSH(threshold=max(0.05, self.cfg.near_dup_threshold - 0.1), num_perm=self.cfg.num_perm) \
            if self.cfg.near_dup else None
        self._mh: dict = {}  # LSH key -> MinHash, to confirm a candidate by its estimated Jaccard
        self.n_lsh = 0
        if self.cfg.near_dup:  # the random permutations, drawn once (datasketch draws them per MinHash)
            from datasketch import MinHash

            tmpl = MinHash(num_perm=self.cfg.num_perm, seed=1)
            self._perms, self._scheme = tmpl.permutations, tmpl.scheme

    # -- fixes
    def fix(self, text: str, mods: Counter) -> str:
        c = self.cfg

        def apply(fn, key):  # one repair; counted when it changed the text
            nonlocal text
            t = fn(text)
            if t != text:
                mods[key] += 1
                text = t

        if c.fix_text:
            if _MOJI_HINT.search(text):  # before stripping controls: mojibake holds C1 characters ftfy needs
                import ftfy

                apply(ftfy.fix_encoding, "mojibake_fixed")
            apply(lambda t: _CTRL.sub("", t), "control_chars")
        if self.t2s is not None:
            apply(self.t2s.convert, "to_simplified")
        if c.mask_pii:
            apply(lambda t: _EMAIL.sub("[EMAIL]", t), "masked_email")
            apply(lambda t: _PHONE.sub("[PHONE]", t), "masked_phone")
        return text

    def parse(self, source, where, rec, fmt) -> _Rec:
        if isinstance(rec, RecordError):
            raise rec
        r = _Rec(source, where, rec, fmt)
        if fmt == "text":
            t = rec if isinstance(rec, str) else rec.get(self.cfg.text_field) if isinstance(rec, dict) else None
            if not isinstance(t, str):
                raise RecordError("missing_field", self.cfg.text_field, "missing or not a string")
            r.responses, r.all_text = [t], t
            return r
        conv = to_conversation(rec)
        r.prompts = [t for role, t in conv.messages if role == USER]
        r.responses = [t for role, t in conv.messages if role == ASSISTANT]
        r.all_text = "\n".join([conv.system or ""] + [t for _, t in conv.messages])
        return r

    def verdict(self, r: _Rec, best: dict | None) -> str | None:
        """The first rule that removes r (None: kept); the dedup state learns r when it passes a dedup rule."""
        c = self.cfg
        texts = r.responses + r.prompts
        if c.fix_text:
            import ftfy.badness

            if any("\ufffd" in t or (len(_MOJI_HINT.findall(t)) >= 3 and ftfy.badness.is_bad(t)) for t in texts):
                return "broken_text"
        norm = normalize(r.all_text)
        if c.exact_dup:
            k = _digest(norm)
            if k in self.exact:
                return "exact_dup"
            self.exact.add(k)
        if c.min_response_chars and any(len(t.strip()) < c.min_response_chars for t in r.responses):
            return "empty_response"
        if c.repeats_instruction and r.prompts:
            for p, a in zip(r.prompts, r.responses):
                np_, na = normalize(p), normalize(a)
                if na and (na == np_ or (na in np_ and len(na) >= 0.8 * len(np_))):
                    return "repeats_instruction"
        if c.truncated and r.fmt != "text":
            last = r.responses[-1]
            if len(last.strip()) >= c.truncated_min_chars and not _ends_sentence(last):
                return "truncated_response"
        if c.max_chars and len(r.all_text) > c.max_chars:
            return "too_long"
        if c.lang == "zh":
            cjk, lat = len(_CJK.findall(r.all_text)), len(_LATIN.findall(r.all_text))
            if cjk + lat and cjk / (cjk + lat) < c.min_cjk_share:
                return "language"
        if c.repetition:
            for t in r.responses:
                if len(t) >= 4 * c.rep_ngram and (_rep_share(t, c.rep_ngram) > c.max_rep_ngram_share
                                                 or _dup_line_share(t) > c.max_dup_line_share):
                    return "repetition"
        if c.refusal and r.fmt != "text" and any(p.search(t) for t in r.responses for p in self.refusal):
            return "refusal"
        if c.prompt_dup and r.prompts:
            pk = _digest(normalize("\n".join(r.prompts)))
            if best is not None:  # keep="longest", second pass: only the chosen record of each prompt
                if best.get(pk) != (r.source, r.where):
                    return "prompt_dup"
            elif pk in self.prompts:
                return "prompt_dup"
            self.prompts.add(pk)
        if self.lsh is not None:
            from datasketch import MinHash

            n = c.near_dup_ngram
            grams = {norm[i:i + n] for i in range(max(1, len(norm) - n + 1))}
            # crc32 (C) instead of datasketch's default sha1 (Python-level, 70 % of the run time measured on
            # the sharegpt file); 32 bits is what MinHash keeps of any hash anyway
            m = MinHash(num_perm=c.num_perm, seed=1, hashfunc=zlib.crc32, permutations=self._perms,
                        scheme=self._scheme)
            m.update_batch([g.encode("utf-8") for g in grams])
            for key in self.lsh.query(m):
                if self._mh[key].jaccard(m) >= c.near_dup_threshold:
                    return "near_dup"
            key = str(self.n_lsh)
            self.n_lsh += 1
            self.lsh.insert(key, m)
            self._mh[key] = m
        return None


def _iter_input(path: str, cfg: CleanConfig):
    """(source, where, record) of one input: txt lines, or json/jsonl records."""
    if path.endswith(".txt"):
        if not os.path.isfile(path):
            raise DataError(f"{path}: data file not found")
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.rstrip(b"\r\n").decode("utf-8")
                except UnicodeDecodeError as e:
                    yield path, f"line {n}", RecordError("invalid_utf8", None, f"invalid UTF-8 ({e.reason})")
                    continue
                yield path, f"line {n}", line
        return
    yield from read_records([path])


def _input_kind(path: str) -> str:
    if path.endswith(".txt"):
        return "txt"
    if path.endswith(".jsonl"):
        return "jsonl"
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("utf-8-sig", errors="ignore").lstrip()
    return "json" if head.startswith("[") else "jsonl"


class _Writer:
    def __init__(self, path: Path, kind: str):
        self.path, self.kind = path, kind
        self.tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        self.f = open(self.tmp, "w", encoding="utf-8", newline="\n")
        self.n = 0
        if kind == "json":
            self.f.write("[")

    def write(self, rec):
        if self.kind == "txt":
            self.f.write(rec + "\n")
        elif self.kind == "json":
            self.f.write(("," if self.n else "") + "\n  " + json.dumps(rec, ensure_ascii=False))
        else:
            self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.n += 1

    def close(self):
        if self.kind == "json":
            self.f.write("\n]\n")
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self):
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _example(r: _Rec, detail: str | None = None) -> dict:
    text = r.all_text if r.all_text else json.dumps(r.rec, ensure_ascii=False) if not isinstance(r.rec, Exception) else ""
    ex = {"file": os.path.basename(r.source), "where": r.where, "text": text[:160] + ("…" if len(text) > 160 else "")}
    if detail:
        ex["detail"] = detail
    return ex


def clean(inputs, out_dir: str | os.PathLike, cfg: CleanConfig | None = None, report_path: str | None = None) -> dict:
    """Clean `inputs` (paths / globs) into `out_dir`; returns (and writes) the report."""
    cfg = cfg or CleanConfig()
    if cfg.keep not in ("first", "longest"):
        raise DataError(f"keep must be 'first' or 'longest', not {cfg.keep!r}")
    if cfg.format not in ("auto", "alpaca", "sharegpt", "text"):
        raise DataError(f"format must be auto, alpaca, sharegpt or text, not {cfg.format!r}")
    files = expand(list(inputs) if not isinstance(inputs, str) else [inputs])
    names = [os.path.basename(f) for f in files]
    if len(set(names)) != len(names):
        raise DataError(f"two inputs share a file name ({names}); the outputs would collide")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        if not os.path.isfile(f):
            raise DataError(f"{f}: data file not found")
        if Path(f).resolve() == (out / os.path.basename(f)).resolve():
            raise DataError(f"{f}: the output directory holds the input; choose another --out")
    cl = Cleaner(cfg)
    t0 = time.perf_counter()
    best = None
    if cfg.prompt_dup and cfg.keep == "longest":
        best = _longest_pass(cl, files, cfg)
        cl.reset()
    removed = {r: 0 for r in RULES}
    examples: dict[str, list] = {r: [] for r in RULES}
    mods: Counter = Counter()
    per_file: dict[str, dict] = {}
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="cleaning", unit="rec", dynamic_ncols=True)
    n_in = n_out = 0
    writers = []
    try:
        for f in files:
            kind = _input_kind(f)
            w = _Writer(out / os.path.basename(f), kind)
            writers.append(w)
            pf = per_file[f] = {"in": 0, "out": 0, "removed": Counter(), "format": None}
            for source, where, rec, r, why, detail in _stream(cl, f, cfg, mods, best):
                pf["in"] += 1
                n_in += 1
                if pf["format"] is None and r is not None:
                    pf["format"] = r.fmt
                if why is None:
                    w.write(r.rec)
                    pf["out"] += 1
                    n_out += 1
                else:
                    removed[why] += 1
                    pf["removed"][why] += 1
                    if len(examples[why]) < cfg.examples:
                        examples[why].append(_example(r, detail) if r is not None else
                                             {"file": os.path.basename(source), "where": where, "detail": detail})
                if bar is not None:
                    bar.update(1)
            if pf["in"] == 0:
                raise DataError(f"{f}: no records")
            w.close()
            writers.remove(w)
    finally:
        for w in writers:
            w.abort()
        if bar is not None:
            bar.close()
    secs = time.perf_counter() - t0
    report = {
        "inputs": {f: {"format": v["format"], "in": v["in"], "out": v["out"], "removed": dict(v["removed"])}
                   for f, v in per_file.items()},
        "records_in": n_in, "records_out": n_out,
        "removed": removed, "modified": {k: mods[k] for k in FIXES},
        "enabled": _enabled(cfg), "examples": {k: v for k, v in examples.items() if v},
        "config": asdict(cfg), "seconds": round(secs, 3), "records_per_sec": round(n_in / max(secs, 1e-9), 1),
    }
    rp = Path(report_path) if report_path else out / "clean_report.json"
    tmp = rp.with_name(rp.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, rp)
    return report


def _enabled(c: CleanConfig) -> dict:
    return {"invalid_record": True, "broken_text": c.fix_text, "exact_dup": c.exact_dup,
            "empty_response": c.min_response_chars > 0, "repeats_instruction": c.repeats_instruction,
            "truncated_response": c.truncated, "too_long": c.max_chars > 0, "language": c.lang == "zh",
            "repetition": c.repetition, "refusal": c.refusal, "prompt_dup": c.prompt_dup, "near_dup": c.near_dup}


def _stream(cl: Cleaner, f: str, cfg: CleanConfig, mods: Counter, best):
    """(source, where, raw, parsed record or None, removing rule or None, detail) per input record."""
    fmt = None if cfg.format == "auto" else cfg.format
    for source, where, rec in _iter_input(f, cfg):
        if fmt is None and not isinstance(rec, RecordError):
            fmt = detect_format(rec)
        rec_fmt = fmt or "text"
        if not isinstance(rec, RecordError):
            rec = _map_record(rec, rec_fmt, lambda t: cl.fix(t, mods), cfg.text_field)
        try:
            r = cl.parse(source, where, rec, rec_fmt)
        except RecordError as e:
            why = "empty_response" if e.reason == "empty_response" and cfg.min_response_chars else "invalid_record"
            yield source, where, rec, None, why, f"{e.reason}: {e}"
            continue
        yield source, where, rec, r, cl.verdict(r, best), None


def _longest_pass(cl: Cleaner, files, cfg: CleanConfig) -> dict:
    """keep='longest': for each prompt, the (source, where) of its longest-response surviving record."""
    saved = (cfg.prompt_dup, cl.lsh)
    cfg.prompt_dup, cl.lsh = False, None
    best: dict = {}
    try:
        for f in files:
            for source, where, rec, r, why, _ in _stream(cl, f, cfg, Counter(), None):
                if why is None and r.prompts:
                    pk = _digest(normalize("\n".join(r.prompts)))
                    n = sum(len(t) for t in r.responses)
                    if pk not in best or n > best[pk][0]:
                        best[pk] = (n, (source, where))
    finally:
        cfg.prompt_dup, cl.lsh = saved
    return {k: v[1] for k, v in best.items()}


def format_table(report: dict) -> str:
    """The report as a plain-text table (stdout)."""
    n = max(1, report["records_in"])
    lines = [f"{'rule':<22}{'on':>4}{'removed':>9}{'share':>8}  example", "-" * 78]
    for rule in RULES:
        k = report["removed"][rule]
        ex = report["examples"].get(rule, [{}])[0]
        s = (ex.get("text") or ex.get("detail") or "").replace("\n", " ")[:38]
        lines.append(f"{rule:<22}{'yes' if report['enabled'][rule] else 'no':>4}{k:>9}{k / n:>8.1%}  {s}")
    lines.append("-" * 78)
    lines.append("modified: " + ", ".join(f"{k}={v}" for k, v in report["modified"].items()))
    for f, v in report["inputs"].items():
        lines.append(f"{os.path.basename(f)} [{v['format']}]: {v['in']} in -> {v['out']} out")
    lines.append(f"total: {report['records_in']} in -> {report['records_out']} out "
                 f"({report['records_per_sec']:.0f} records/s)")
    return "\n".join(lines)

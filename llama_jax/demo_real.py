"""`llama-jax demo --data DIR [--base stories260K|DIR|FILE.bin] [--out DIR] [--size default|tiny]`.

The seed's method on real data from a real pretrained base: "take a pretrained English LLaMA,
teach it Chinese".  Each stage is an ordinary `llama-jax <stage>` run whose YAML is written to
OUT/configs; every number is measured on data the stage did not train on.

Contract
- DATA must have the ../shared/data layout (`REQUIRED_FILES`); otherwise one FileNotFoundError
  names every missing file.  BASE: `stories260K` (default: DATA/models/stories260K, a llama2.c
  .bin + tok512.model, converted with `llama_jax.convert`), a llama2.c `.bin` with a sentencepiece
  tokenizer.model beside it, or an HF Llama directory (config.json model_type llama) with a
  sentencepiece tokenizer.model (LLaMA-2) or a byte-level BPE tokenizer.json (SmolLM2); anything
  else is refused with a ValueError before any work.
- Stages: 1 tokenizer (sentencepiece: a Chinese BPE on the zh corpora, vocab raised to cover their
  characters, merged into the base's model; byte-level: continuation BPE merges appended to the
  base's; chars/token on held-out Chinese and the check that held-out English encodes to the same
  ids), 2 resize (sub-piece-mean rows), 3 continued pretraining (full for a base under
  `FULL_TRAIN_MAX_PARAMS`, else LoRA + embed/lm_head) on the zh corpora with English replay
  (`english_replay`, share `en_replay` of the rows) and eval sets zh / en logged in metrics.jsonl,
  and bits per character of both held-out files through `llama-jax eval` before (base model + base
  tokenizer, and resized) and after, 4 SFT on zh-sft cleaned by `llama-jax data clean` (its report
  kept), 5 reward model (held-out pair accuracy), 6 PPO and 7 GRPO against the RM (held-out
  prompts: RM score of greedy replies before/after, KL, length), 8 CMMLU / C-Eval (a few
  subjects, --limit) through `llama-jax eval`, samples, plots.  Sizes: `SIZES[--size]` with
  `--seed` and `--set KEY=VALUE` applied (`sizes_for`).
- OUT/report.json is rewritten after every stage (a stopped run still has one); each stage entry
  has `meaning` and `cannot_show`.  Exit status 0 only when every stage ran.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

import llama_jax

from .config import LlamaConfig
from .convert import ConvertConfig, convert
from .data.clean import CleanConfig, clean
from .data.en_stories import STORIES as EN_STORIES
from .demo import TEMPLATE, Report, answers, rm_scores
from .export import export
from .fsutil import write_text_atomic
from .plots import demo_plots, read_metrics
from .stages import grpo, ppo, pretrain, reward, sft
from .stages.evaluate import EvalConfig, run_eval
from .text import encode, load_tokenizer
from .tokenizer.byte_bpe import ByteBPEOptions, extend_byte_level_bpe
from .tokenizer.byte_bpe import pad_id_of as byte_bpe_pad_id
from .tokenizer.merge import MergeOptions, merge_tokenizers
from .tokenizer.train import TrainOptions, train_bpe
from .vocab_resize import byte_level_dir, resize_embeddings

# A base below this many parameters is trained in full in continued pretraining (stories260K:
# 0.26M); larger bases train LoRA factors + embed_tokens / lm_head (Chinese-LLaMA-2's recipe).
FULL_TRAIN_MAX_PARAMS = 50_000_000

ZH_TRAIN = ("zh-corpus/clue_corpus_small_sample.txt",)
ZH_EVAL_SOURCE = "zh-corpus/cmrc2018_wiki_paragraphs.txt"   # its last lines are held out
SFT_FILES = ("zh-sft/alpaca_zh_demo.json", "zh-sft/belle_open_source_1k.jsonl")
PPO_EVAL_PROMPTS = "zh-sft/belle_eval_set.jsonl"             # never trained on by any stage
PREF_FILES = ("zh-pref/oaast_rm_zh.json", "zh-pref/dpo_zh_500.jsonl")
EN_WIKI = "en-corpus/wiki_demo.txt"
CMMLU = "benchmarks/cmmlu"
CEVAL = "benchmarks/ceval/ceval-exam.zip"
STORIES = "models/stories260K"
REQUIRED_FILES = (*ZH_TRAIN, ZH_EVAL_SOURCE, *SFT_FILES, PPO_EVAL_PROMPTS, *PREF_FILES, EN_WIKI, CMMLU, CEVAL)

CMMLU_SUBJECTS = ["chinese_history", "computer_science", "elementary_chinese"]
CEVAL_SUBJECTS = ["computer_network", "high_school_chinese", "modern_chinese_history"]


@dataclass
class RealSizes:
    """Data and step counts (default: sized for a heavily shared 2-core machine; docs/demo.md)."""
    zh_train_lines: int | None = None    # lines of each zh training corpus (None: all)
    zh_eval_lines: int = 40              # last lines of cmrc2018: held-out Chinese
    en_eval_chars: int = 20000           # wiki_demo characters (HF bases; stories260K: en_stories)
    zh_vocab: int = 4000                 # requested; raised to cover the corpus's characters
    block_size: int = 256
    en_replay: float = 0.25              # share of continued-pretraining rows that replay English (0: none)
    replay_docs: int = 128               # English replay documents (stories260K: sampled from the base)
    replay_tokens: int = 240             # tokens per sampled replay story
    pretrain_steps: int = 120
    pretrain_batch: int = 16
    pretrain_lr: float = 1e-3
    sft_eval: int = 64
    sft_steps: int = 40
    sft_batch: int = 16
    rm_eval_pairs: int = 60              # per preference file
    rm_steps: int = 60
    rm_batch: int = 8
    rm_norm_samples: int = 512           # chosen replies scored for the RM's reward offset
    # 512 = stories260K's context: at 192 (the first default) 836 of 1152 training responses were cut
    # and the RM stayed at chance (47.5 %); at 512 it reached 64 % held out (docs/demo.md)
    rm_max_length: int = 512
    ppo_batch: int = 16                  # sampled replies per PPO / GRPO iteration (GRPO: 4 prompts x 4)
    ppo_prompts: int = 256
    ppo_eval_prompts: int = 16
    ppo_steps: int = 6
    mc_limit: int = 10                   # questions per CMMLU / C-Eval subject
    samples: int = 2
    seed: int = 0


SIZES = {
    "default": RealSizes(),
    # the test-suite run: every stage, a few steps each; numbers still checked (tests/test_demo_real.py)
    "tiny": RealSizes(zh_train_lines=400, zh_eval_lines=8, en_eval_chars=4000, zh_vocab=1000, block_size=128,
                      pretrain_steps=40, pretrain_batch=8, sft_eval=48, sft_steps=8, sft_batch=8, rm_eval_pairs=40,
                      rm_steps=60, rm_batch=16, rm_max_length=128, rm_norm_samples=64, ppo_prompts=16,
                      ppo_eval_prompts=4, ppo_steps=1, mc_limit=2, samples=1, replay_docs=32, replay_tokens=120),
}


def sizes_for(size: str | None, seed: int | None = None, overrides: list[str] | tuple = ()) -> RealSizes:
    """SIZES[size] with `--seed` and `--set KEY=VALUE` applied (values parsed as YAML; a wrong key or type
    is a ValueError naming it and the valid keys)."""
    n = SIZES[size or "default"]
    changes = {} if seed is None else {"seed": seed}
    kinds = {f.name: int if f.name == "zh_train_lines" else type(getattr(n, f.name)) for f in fields(RealSizes)}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key not in kinds:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(kinds)}")
        value = yaml.safe_load(text)
        want = kinds[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok and not (value is None and key == "zh_train_lines"):
            raise ValueError(f"--set {key}: expected {want.__name__}, got {text!r}")
        changes[key] = value
    return replace(n, **changes)


# What each stage's numbers mean and cannot show (copied into report.json beside the numbers).
MEANING = {
    "tokenizer": ("chars/token: characters of held-out Chinese (cmrc2018 paragraphs) per token, base vs merged "
                  "tokenizer; english_identical: held-out English encodes to exactly the same ids.",
                  "Nothing about model quality: fewer tokens per character only make Chinese cheaper to train and "
                  "generate, and allow a longer context in characters."),
    "resize": ("New embedding / lm_head rows are the mean of the base rows of the pieces that spell each new "
               "piece; bits per character of held-out text right after resizing (no training yet).",
               "Nothing learnt: the resized model should score close to the base on English and Chinese."),
    "pretrain": ("Bits per character (tokenizer-independent) of held-out Chinese and English before (base model "
                 "with its own tokenizer; resized model) and after continued pretraining, through `llama-jax eval`.",
                 "Chinese bpc falling shows the model learnt Chinese statistics, not that it understands Chinese; "
                 "English bpc rising is forgetting, which a larger base trained with LoRA limits better."),
    "sft": ("Response cross-entropy on held-out cleaned instructions (eval_loss), first vs last eval.",
            "A model this size cannot follow instructions: the loss falls because reply style and frequent "
            "phrases are learnt, not because answers become correct."),
    "rm": ("Accuracy of score(chosen) > score(rejected) on held-out pairs (50% = chance).",
           "Above chance can come from shallow features (e.g. the chosen reply being longer, which holds for most "
           "pairs of these sets): it does not show that the RM judges helpfulness or truth."),
    "ppo": ("RM score of greedy replies to held-out prompts before/after PPO (normalised by the RM's offset), "
            "rollout reward, KL(policy || SFT reference) and reply length during training.",
            "A higher RM score means the policy found what this RM rewards (possibly length or style), not a "
            "better assistant; KL shows how far it moved from the SFT model."),
    "grpo": ("The same measures as PPO for GRPO against the same RM from the same SFT model: G = 4 replies per "
             "prompt scored by the RM, advantages relative to the group's mean (no critic), KL to the SFT model "
             "as a loss term.",
             "As for PPO: a higher RM score shows what this RM rewards, not a better assistant."),
    "benchmarks": ("CMMLU / C-Eval accuracy of the final model on a few subjects (--limit questions each) through "
                   "`llama-jax eval`, scored as lm-eval's HF backend does; chance is 25%.",
                   "Near chance for a model this size: the number shows the chain is measured the way a 7B run "
                   "would be, not knowledge. With a few questions per subject it is also very noisy."),
}


@dataclass
class RealData:
    """Files of one run (written under OUT/data, from DATA)."""
    zh_train: list[Path]
    zh_eval: Path
    en_eval: Path
    sft_train: Path
    sft_eval: Path
    pref_train: Path
    pref_eval: Path
    ppo_prompts: Path
    ppo_eval_prompts: list[str]
    clean_report: dict = field(default_factory=dict)
    en_replay: Path | None = None       # English replay rows for continued pretraining (english_replay)


# ----------------------------------------------------------------------------- inputs
def check_data_dir(data: Path, base: str | None) -> None:
    """One FileNotFoundError naming every file of the ../shared/data layout that DATA lacks."""
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data}: not a directory (expected the ../shared/data layout)")
    need = list(REQUIRED_FILES)
    if base in (None, "stories260K"):
        need += [f"{STORIES}/stories260K.bin", f"{STORIES}/tok512.model"]
    missing = [n for n in need if not (data / n).exists()]
    if missing:
        raise FileNotFoundError(f"--data {data}: missing {', '.join(missing)} (expected the ../shared/data layout, "
                                "see its README.md)")


def _is_sentencepiece(path: Path) -> bool:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    try:
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        return len(proto.pieces) > 0
    except Exception:  # noqa: BLE001 - any parse failure means "not a sentencepiece model"
        return False


def resolve_base(base: str | None, data: Path, out: Path) -> tuple[Path, Path, str]:
    """(HF directory of the base, its sentencepiece tokenizer.model, description).  A llama2.c file is
    converted into OUT/models/base; anything that is not a Llama base with a sentencepiece tokenizer is
    refused with a ValueError saying what was found."""
    if base in (None, "stories260K"):
        src, tok = data / STORIES / "stories260K.bin", data / STORIES / "tok512.model"
        kind = "stories260K (llama2.c, TinyStories; converted with `llama-jax convert --format llama2c`)"
    else:
        p = Path(base)
        if not p.exists():
            raise FileNotFoundError(f"--base {p}: no such file or directory")
        if p.is_dir():
            cfg_path = p / "config.json"
            try:
                cfg = json.loads(cfg_path.read_text("utf-8"))
            except (OSError, json.JSONDecodeError):
                raise ValueError(f"--base {p}: not an HF Llama directory (no readable config.json) nor a llama2.c "
                                 ".bin file") from None
            if cfg.get("model_type") != "llama":
                raise ValueError(f"--base {p}: {cfg_path} has model_type {cfg.get('model_type')!r}, not 'llama'")
            tok = p / "tokenizer.model"
            if tok.is_file() and _is_sentencepiece(tok):
                return p, tok, f"HF Llama directory {p} (sentencepiece tokenizer)"
            if byte_level_dir(p) is not None:  # SmolLM2-style tokenizer.json: extended by tokenizer/byte_bpe.py
                return p, p, f"HF Llama directory {p} (byte-level BPE tokenizer.json)"
            raise ValueError(f"--base {p}: neither a sentencepiece tokenizer.model nor a byte-level BPE "
                             f"tokenizer.json (found "
                             f"{', '.join(sorted(x.name for x in p.glob('tokenizer*'))) or 'no tokenizer files'})")
        src = p
        tok = p.parent / "tokenizer.model"
        if not tok.is_file():
            raise ValueError(f"--base {p}: a llama2.c .bin needs its sentencepiece tokenizer.model beside it ({tok})")
        kind = f"llama2.c file {p}"
    if not _is_sentencepiece(tok):
        raise ValueError(f"--base: {tok} is not a sentencepiece model")
    dest = out / "models" / "base"
    if dest.exists():
        shutil.rmtree(dest)
    # read_llama2c refuses files whose header does not match their size (ConvertError, a ValueError)
    convert(ConvertConfig(format="llama2c", src=src, out=dest, tokenizer=tok, progress=False))
    return dest, dest / "tokenizer.model", kind


def _jsonl(path: Path, records) -> Path:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def _records(path: Path) -> list[dict]:
    text = path.read_text("utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def prepare_data(data: Path, out: Path, n: RealSizes, stories_base: bool) -> RealData:
    """Splits written under OUT/data: held-out Chinese / English, cleaned SFT (train / eval), preference
    pairs (train / held-out per file), PPO prompts (train: SFT prompts not used for SFT eval; held-out:
    belle_eval_set questions)."""
    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    zh_train = []
    for rel in ZH_TRAIN:
        src = data / rel
        if n.zh_train_lines:
            lines = src.read_text("utf-8").splitlines()[:n.zh_train_lines]
            src = d / f"zh_train_{Path(rel).stem}.txt"
            write_text_atomic(src, "".join(x + "\n" for x in lines))
        zh_train.append(src)
    held = [x for x in (data / ZH_EVAL_SOURCE).read_text("utf-8").splitlines() if x.strip()]
    # the rest of cmrc2018 trains; its last zh_eval_lines paragraphs are the held-out Chinese
    cut = len(held) - n.zh_eval_lines
    train_cmrc = held[:cut] if not n.zh_train_lines else held[:min(cut, n.zh_train_lines // 4)]
    write_text_atomic(d / "zh_train_cmrc2018.txt", "".join(x + "\n" for x in train_cmrc))
    zh_train.append(d / "zh_train_cmrc2018.txt")
    zh_eval = d / "zh_eval.txt"
    write_text_atomic(zh_eval, "".join(x + "\n" for x in held[cut:]))
    en_eval = d / "en_eval.txt"
    if stories_base:
        en = EN_STORIES
    else:
        en, total = [], 0
        for line in (data / EN_WIKI).read_text("utf-8").splitlines():
            if total >= n.en_eval_chars:
                break
            en.append(line[:n.en_eval_chars - total])
            total += len(en[-1])
    write_text_atomic(en_eval, "".join(x + "\n" for x in en))

    # SFT: `llama-jax data clean` (its report kept in OUT/data/clean/report.json), then split
    report = clean([str(data / f) for f in SFT_FILES], d / "clean", CleanConfig(lang="zh", progress=False),
                   report_path=str(d / "clean" / "report.json"))
    sft = []
    for f in SFT_FILES:
        sft += [r for r in _records(d / "clean" / Path(f).name)]
    random.Random(f"sft:{n.seed}").shuffle(sft)
    sft_eval, sft_train = sft[:n.sft_eval], sft[n.sft_eval:]
    # PPO trains on prompts of the SFT eval split's complement it has not seen replies to: the last ones
    ppo_train = [{"instruction": r["instruction"] + (("\n" + r["input"]) if r.get("input") else "")}
                 for r in sft_train[-n.ppo_prompts:]]
    pref_train, pref_eval = [], []
    for f in PREF_FILES:
        recs = _records(data / f)
        pref_train += recs[:-n.rm_eval_pairs]
        pref_eval += recs[-n.rm_eval_pairs:]
    random.Random(f"pref:{n.seed}").shuffle(pref_train)
    ev = [r["question"] for r in _records(data / PPO_EVAL_PROMPTS)]
    ev = [q for q in ev if len(q) <= 60][:n.ppo_eval_prompts]  # short prompts: a small context
    return RealData(zh_train=zh_train, zh_eval=zh_eval, en_eval=en_eval,
                    sft_train=_jsonl(d / "sft_train.jsonl", sft_train), sft_eval=_jsonl(d / "sft_eval.jsonl", sft_eval),
                    pref_train=_jsonl(d / "pref_train.jsonl", pref_train),
                    pref_eval=_jsonl(d / "pref_eval.jsonl", pref_eval),
                    ppo_prompts=_jsonl(d / "ppo_prompts.jsonl", ppo_train), ppo_eval_prompts=ev,
                    clean_report={"records_in": report["records_in"], "records_out": report["records_out"],
                                  "removed": {k: v for k, v in report["removed"].items() if v},
                                  "modified": {k: v for k, v in report["modified"].items() if v}})


# ----------------------------------------------------------------------------- stages
# Openings of the replay stories sampled from stories260K (it was trained on TinyStories).
REPLAY_OPENINGS = ("Once upon a time", "One day", "There was a little", "Tom and Lily", "The sun was",
                   "Sara had a", "Max wanted to", "In a small town")
EN_REPLAY_C4 = "en-corpus/c4_demo.jsonl"


def english_replay(base_dir: Path, base_tok: Path, data_dir: Path, out: Path, n: RealSizes,
                   stories: bool) -> tuple[Path | None, dict]:
    """English rows mixed into continued pretraining (share `n.en_replay` of the rows), so the base
    keeps more of its English (measured in docs/demo.md, with and without).

    stories260K: the text it was trained on (TinyStories) is not in the shared data, so the replay is
    stories sampled from the base itself at temperature 1 (self-synthesised rehearsal, Huang et al.,
    ACL 2024); they are not the held-out English (data/en_stories.py, written by hand).  HF bases:
    c4_demo.jsonl (real web English; their held-out English is wiki_demo)."""
    if n.en_replay <= 0:
        return None, {"share": 0.0}
    dest = out / "data" / "en_replay.txt"
    if stories:
        model = llama_jax.load(base_dir)
        tok = load_tokenizer(base_tok)
        prompts = [REPLAY_OPENINGS[i % len(REPLAY_OPENINGS)] for i in range(n.replay_docs)]
        docs = llama_jax.generate(model, prompts, tok, max_new_tokens=n.replay_tokens, temperature=1.0,
                                  seed=n.seed)
        docs = [" ".join((p + ("" if d.lstrip()[:1] in tuple(",.!?;:'") else " ") + d.strip()).split())
                for p, d in zip(prompts, docs)]
        source = f"{len(docs)} stories sampled from the base (T=1, {n.replay_tokens} tokens, seed {n.seed})"
    else:
        docs = [" ".join(r["text"].split()) for r in _records(data_dir / EN_REPLAY_C4)][:n.replay_docs]
        source = f"{len(docs)} documents of {EN_REPLAY_C4}"
    write_text_atomic(dest, "".join(d + "\n" for d in docs if d))
    return dest, {"share": n.en_replay, "source": source, "documents": len(docs),
                  "characters": sum(map(len, docs)), "file": str(dest)}


def _merge_byte_level(base_dir: Path, data: RealData, dest: Path, n: RealSizes) -> dict:
    """Continuation BPE on the zh corpora appended to the base's byte-level tokenizer.json; the vocab
    gains a `<|pad|>` (SmolLM2 pads with its EOS) and is padded to a multiple of 64 with fillers.

    Size from the data, as the sentencepiece path raises its vocab to cover the corpus's characters:
    at least two merges (a 3-byte character needs two) per distinct corpus character in U+3000-U+9FFF /
    U+F000-U+FFFF that the base spells with several tokens (SmolLM2 lacks 5,266 of the 5,358 in the
    shared zh corpora), and never below `zh_vocab`."""
    from tokenizers import Tokenizer

    base = Tokenizer.from_file(str(base_dir / "tokenizer.json"))
    chars = {c for f in data.zh_train for c in f.read_text("utf-8") if "\u3000" <= c <= "\u9fff" or c >= "\uf000"}
    lacking = sum(len(base.encode(c, add_special_tokens=False).ids) > 1 for c in chars)
    want = max(n.zh_vocab, 2 * lacking)
    notice = (f"raised from {n.zh_vocab} to {want}: two merges per corpus character the base spells with several "
              f"tokens ({lacking} of {len(chars)})") if want > n.zh_vocab else ""
    print(f"learning {want} byte-level merges on {len(data.zh_train)} Chinese files ({notice or 'as requested'})",
          flush=True)
    r = extend_byte_level_bpe(base_dir, data.zh_train, dest,
                              ByteBPEOptions(num_new_tokens=want, pad_token=True, pad_to_multiple_of=64))
    return {"kind": "byte-level BPE (continuation training, tokenizer/byte_bpe.py)", "base_vocab": r.base_vocab,
            "chinese_vocab": r.new_tokens, "vocab_notice": notice, "merged_vocab": r.merged_vocab,
            "pad_id": byte_bpe_pad_id(dest), "merge_seconds": round(r.seconds, 1)}


def _merge_sentencepiece(base_tok: Path, data: RealData, d: Path, n: RealSizes) -> dict:
    """Chinese sentencepiece BPE (vocab raised to cover the corpus's characters) merged into the base's."""
    zh = train_bpe(d / "zh", input_files=data.zh_train,
                   options=TrainOptions(vocab_size=n.zh_vocab, raise_vocab_to_cover=True, seed=n.seed))
    merge_tokenizers(base_tok, zh.model_path, d / "merged", MergeOptions(pad_token=True, pad_to_multiple_of=64))
    merged = load_tokenizer(d / "merged" / "tokenizer.model")
    return {"kind": "sentencepiece BPE merged into the base's model (tokenizer/merge.py)",
            "base_vocab": len(load_tokenizer(base_tok)), "chinese_vocab": zh.vocab_size, "vocab_notice": zh.notice,
            "merged_vocab": len(merged), "pad_id": merged.sp.piece_to_id("<pad>")}


def tokenizer_stage(out: Path, data: RealData, base_tok: Path, n: RealSizes) -> tuple[Path, dict]:
    """Chinese tokens added to the base's tokenizer, whichever kind it is: a sentencepiece model
    (LLaMA-2, stories260K) or an HF byte-level BPE tokenizer.json (SmolLM2).  Returns the merged
    tokenizer (the path `load_tokenizer` and the stages take) and the stage's metrics."""
    d = out / "tokenizer"
    merged_path = d / "merged"
    if byte_level_dir(base_tok) is not None:
        m = _merge_byte_level(base_tok, data, merged_path, n)
    else:
        m = _merge_sentencepiece(base_tok, data, d, n)
    base_t, new_t = load_tokenizer(base_tok), load_tokenizer(merged_path)
    zh_lines = data.zh_eval.read_text("utf-8").splitlines()
    en_lines = data.en_eval.read_text("utf-8").splitlines()
    chars = sum(len(x) for x in zh_lines)
    m = {"base_tokenizer": str(base_tok), "chinese_vocab_requested": n.zh_vocab, **m, "eval_chars": chars,
         "eval_tokens_base": sum(len(encode(base_t, x, special=False)) for x in zh_lines),
         "eval_tokens_merged": sum(len(encode(new_t, x, special=False)) for x in zh_lines)}
    m["chars_per_token_base"] = round(chars / m["eval_tokens_base"], 4)
    m["chars_per_token_merged"] = round(chars / m["eval_tokens_merged"], 4)
    m["chars_per_token_gain"] = round(m["chars_per_token_merged"] / m["chars_per_token_base"], 3)
    same = [encode(base_t, x, special=False) == encode(new_t, x, special=False) for x in en_lines]
    m["english_lines"], m["english_identical_lines"] = len(same), sum(same)
    m["english_identical"] = all(same)
    return merged_path, m


def resize_stage(base_dir: Path, base_tok: Path, tok_dir: Path, dest: Path) -> dict:


    model = llama_jax.load(base_dir)
    old = model.config.vocab_size
    merged = tok_dir if byte_level_dir(tok_dir) is not None else tok_dir / "tokenizer.model"
    new = resize_embeddings(model, merged, base_tok)
    llama_jax.save_hf(new, dest, tokenizer=tok_dir)
    return {"vocab_before": old, "vocab_after": new.config.vocab_size, "pad_token_id": new.config.pad_token_id,
            "init": "sub-piece mean (llama_jax.vocab_resize.resize_embeddings)"}


def bpc(model_dir: Path, tok: Path, files: dict[str, Path], max_length: int) -> dict:
    """Bits per character / perplexity of each file through `llama-jax eval` (its run_eval)."""
    res = run_eval(EvalConfig(model=str(model_dir), tokenizer=str(tok), tasks=["ppl"],
                              data=[str(p) for p in files.values()], max_length=max_length, progress=False))
    by_file = res["tasks"]["ppl"]["files"]
    return {name: {k: round(by_file[str(p)][k], 4) for k in ("bpc", "ppl", "loss", "tokens")}
            for name, p in files.items()}


def benchmarks(model_dir: Path, data: Path, n: RealSizes, out: Path) -> dict:
    """CMMLU / C-Eval on a few subjects through `llama-jax eval` (results JSON in OUT/eval)."""
    res = {}
    for task, path, subjects in (("cmmlu", data / CMMLU, CMMLU_SUBJECTS), ("ceval", data / CEVAL, CEVAL_SUBJECTS)):
        r = run_eval(EvalConfig(model=str(model_dir), tasks=[task], data=[f"{task}={path}"], subjects=subjects,
                                limit=n.mc_limit, progress=False, out=str(out / "eval" / f"{task}.json")))
        t = r["tasks"][task]
        res[task] = {"questions": t["n"], "correct": t["correct"], "accuracy": round(t["acc_micro"], 4),
                     "subjects": {s: round(v["acc"], 4) for s, v in t["subjects"].items()}, "chance": 0.25}
    return res


def stage_configs(out: Path, data: RealData, tok_dir: Path, tm: dict, n: RealSizes, full: bool,
                  tied: bool = False) -> dict:
    """pretrain / sft / rm / ppo configs (plain `llama-jax <stage>` YAML), chained through exports.
    tied: the base shares embed_tokens with the output projection (stories260K), so there is no
    separate lm_head to train in full."""
    models = out / "models"
    full_modules = ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]
    common = {"seed": n.seed, "log_every": 5, "warmup_ratio": 0.05, "schedule": "cosine"}
    lora = {"enabled": True, "rank": 16, "alpha": 32, "dropout": 0.0}
    s = lambda ps: [str(Path(p).absolute()) for p in ps]  # noqa: E731
    pre = {
        "model": {"init": str(models / "resized")},
        "tokenizer": str(tok_dir),
        "data": {"train_files": s(data.zh_train), "eval_files": s([data.zh_eval]), "block_size": n.block_size,
                 "eval_sets": {"zh": s([data.zh_eval]), "en": s([data.en_eval])}},
        "train": {**common, "steps": n.pretrain_steps, "batch_size": n.pretrain_batch, "lr": n.pretrain_lr,
                  "eval_every": max(10, n.pretrain_steps // 8), "eval_batches": 4,
                  "checkpoint_every": n.pretrain_steps},
    }
    # PPO and GRPO: a LoRA policy from the SFT model on the same prompts
    rollout = {"model": {"init": str(models / "sft")}, "tokenizer": str(tok_dir), "lora": lora,
               "data": {"prompt_files": s([data.ppo_prompts]), "template": TEMPLATE, "max_prompt_length": 64}}
    if data.en_replay is not None:  # Chinese and replayed English rows drawn in proportion
        del pre["data"]["train_files"]
        pre["data"]["mixture"] = [{"files": s(data.zh_train), "weight": round(1 - n.en_replay, 6)},
                                  {"files": s([data.en_replay]), "weight": n.en_replay}]
    if not full:
        pre["lora"] = {**lora, "trainable_modules": full_modules}
        pre["train"]["lr"] = 2e-4
    return {
        "pretrain": pre,
        "sft": {
            "model": {"init": str(models / "pretrained")},
            "tokenizer": str(tok_dir),
            "lora": {**lora, "trainable_modules": full_modules},
            "data": {"train_files": s([data.sft_train]), "eval_files": s([data.sft_eval]), "template": TEMPLATE,
                     "max_length": n.block_size, "batching": "pack",
                     "sample_prompts": data.ppo_eval_prompts[:2], "sample_max_new_tokens": 24},
            "train": {**common, "steps": n.sft_steps, "batch_size": n.sft_batch, "lr": 2e-3, "weight_decay": 0.0,
                      "eval_every": max(4, n.sft_steps // 4), "eval_batches": 4, "checkpoint_every": n.sft_steps},
        },
        "rm": {
            "model": {"init": str(models / "sft")},
            "tokenizer": str(tok_dir),
            "data": {"train_files": s([data.pref_train]), "eval_files": s([data.pref_eval]), "template": TEMPLATE,
                     "max_length": n.rm_max_length, "pad_id": tm["pad_id"], "pad_to_multiple": 32},
            "rm": {"center_coef": 0.01, "norm_samples": n.rm_norm_samples},
            "train": {**common, "steps": n.rm_steps, "batch_size": n.rm_batch, "lr": 1e-3, "min_lr_ratio": 0.0,
                      "eval_every": max(10, n.rm_steps // 5), "checkpoint_every": n.rm_steps},
        },
        "ppo": {
            **rollout,
            "ppo": {"reward_model": str(models / "rm"), "max_new_tokens": 32, "temperature": 0.7, "epochs": 2,
                    "minibatches": 2, "kl_coef": 0.05, "missing_eos_score": -1.0},
            "train": {**common, "steps": n.ppo_steps, "batch_size": n.ppo_batch, "lr": 5e-4, "warmup_ratio": 0.0,
                      "schedule": "constant", "log_every": 1, "checkpoint_every": n.ppo_steps},
        },
        # GRPO against the same RM, from the same SFT model: G = 4 samples per prompt and a group-relative
        # baseline instead of PPO's critic; the same number of sampled replies per iteration as PPO
        "grpo": {
            **rollout,
            "grpo": {"reward_model": str(models / "rm"), "group_size": 4, "max_new_tokens": 32, "temperature": 0.7,
                     "epochs": 1, "minibatches": 2, "clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.05,
                     "kl_in": "loss", "aggregation": "token", "missing_eos_score": -1.0},
            "train": {**common, "steps": n.ppo_steps, "batch_size": max(1, n.ppo_batch // 4), "lr": 5e-4,
                      "warmup_ratio": 0.0,
                      "schedule": "constant", "log_every": 1, "checkpoint_every": n.ppo_steps},
        },
    }


def _series(recs: list[dict], key: str) -> list:
    return [r[key] for r in recs if key in r]


def _end(recs: list[dict], key: str, first: bool = False):
    v = _series(recs, key)
    return (v[0] if first else v[-1]) if v else None


def plot_bpc(runs: Path, before: dict, out: Path) -> Path:
    """Held-out bits per character of zh / en during continued pretraining (eval sets), with the base
    model's own-tokenizer level drawn as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(runs / "pretrain")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, color in (("zh", "tab:red"), ("en", "tab:blue")):
        pts = [(r["step"], r[f"eval_{name}_bpc"]) for r in recs if f"eval_{name}_bpc" in r]
        if pts:
            ax.plot(*zip(*pts), "o-", color=color, label=f"{name} (held-out)")
        if name in before:
            ax.axhline(before[name]["bpc"], color=color, ls="--", lw=0.8, label=f"{name}: base model")
    ax.set_xlabel("step")
    ax.set_yscale("log")  # the base's byte-fallback Chinese (~90 bits/char) and English (~1) on one axis
    ax.set_ylabel("bits per character (log)")
    ax.set_title("continued pretraining: held-out bits per character")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "bpc.png", dpi=110)
    plt.close(fig)
    return out / "bpc.png"


def _header(text: str):
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def _param_count(model_dir: Path) -> int:

    return LlamaConfig.from_json_file(model_dir / "config.json").num_params()


def run_real_demo(args) -> int:


    t_start = time.perf_counter()
    data_dir, out = Path(args.data), Path(args.out).absolute()
    base_arg = getattr(args, "base", None)
    n = sizes_for(getattr(args, "size", None), getattr(args, "seed", None), getattr(args, "set", None) or ())
    check_data_dir(data_dir, base_arg)
    out.mkdir(parents=True, exist_ok=True)
    runs, models = out / "runs", out / "models"
    base_dir, base_tok, base_kind = resolve_base(base_arg, data_dir, out)
    full = _param_count(base_dir) <= FULL_TRAIN_MAX_PARAMS
    stories = base_arg in (None, "stories260K")
    report = Report(out / "report.json", {"task": f"real data under {data_dir}", "base": base_kind,
                                          "size": getattr(args, "size", None) or "default", "sizes": asdict(n),
                                          "continued_pretraining": "full" if full else "LoRA + embed_tokens/lm_head",
                                          "meaning": {k: {"what": a, "cannot_show": b} for k, (a, b) in MEANING.items()}})
    data = prepare_data(data_dir, out, n, stories)
    data.en_replay, replay = english_replay(base_dir, base_tok, data_dir, out, n, stories)

    def stage(name: str, metrics: dict):
        metrics["meaning"], metrics["cannot_show"] = MEANING[name]
        report.stage(name, metrics)

    _header("1/8 tokenizer: Chinese BPE on the zh corpora, added to the base's tokenizer")
    t0 = time.perf_counter()
    tok_dir, tm = tokenizer_stage(out, data, base_tok, n)
    tm["seconds"] = round(time.perf_counter() - t0, 1)
    stage("tokenizer", tm)
    print(f"base {tm['base_vocab']} + Chinese {tm['chinese_vocab']} -> {tm['merged_vocab']} pieces; held-out Chinese "
          f"chars/token {tm['chars_per_token_base']:.2f} -> {tm['chars_per_token_merged']:.2f} "
          f"(x{tm['chars_per_token_gain']}); English identical: {tm['english_identical']}")

    _header("2/8 resize embeddings (sub-piece mean rows)")
    t0 = time.perf_counter()
    rz = resize_stage(base_dir, base_tok, tok_dir, models / "resized")
    evals = {"zh": data.zh_eval, "en": data.en_eval}
    before_base = bpc(base_dir, base_tok, evals, n.block_size)
    rz["bpc_base_model"] = before_base
    rz["bpc_resized"] = bpc(models / "resized", tok_dir, evals, n.block_size)
    rz["seconds"] = round(time.perf_counter() - t0, 1)
    stage("resize", rz)
    print(f"vocab {rz['vocab_before']} -> {rz['vocab_after']}; bits/char zh {before_base['zh']['bpc']:.3f} -> "
          f"{rz['bpc_resized']['zh']['bpc']:.3f}, en {before_base['en']['bpc']:.3f} -> {rz['bpc_resized']['en']['bpc']:.3f}")
    tok = load_tokenizer(tok_dir)
    cfgs = {}
    tied = bool(json.loads((models / "resized" / "config.json").read_text()).get("tie_word_embeddings"))
    for k, v in stage_configs(out, data, tok_dir, tm, n, full, tied).items():
        cfgs[k] = out / "configs" / f"{k}.yaml"
        write_text_atomic(cfgs[k], yaml.safe_dump(v, allow_unicode=True, sort_keys=False))

    def run_stage(name, module, export_to, exporter=export):
        t0 = time.perf_counter()
        if (runs / name).exists():  # a fresh run: the loop would otherwise resume the old one
            shutil.rmtree(runs / name)
        module.run(cfgs[name], out=str(runs / name))
        exporter(runs / name, models / export_to)
        return read_metrics(runs / name), round(time.perf_counter() - t0, 1)

    samples = []

    def sample(model_name: str, chat: bool):
        model = llama_jax.load(models / model_name)
        if chat:
            qs = data.ppo_eval_prompts[:n.samples + 1]
            replies = answers(model, tok, qs, max_new_tokens=32)
        else:
            qs = ["中国的首都是", "Once upon a time"][:n.samples + 1]
            replies = llama_jax.generate(model, qs, tok, max_new_tokens=32)
        samples.extend({"model": model_name, "prompt": q, "reply": r} for q, r in zip(qs, replies))

    _header("3/8 continued pretraining on the zh corpora (" + ("full" if full else "LoRA + embed/lm_head") + ")")
    recs, secs = run_stage("pretrain", pretrain, "pretrained")
    after = bpc(models / "pretrained", tok_dir, evals, n.block_size)
    pm = {"seconds": secs, "steps": n.pretrain_steps, "tokens_per_sec": _end(recs, "tokens_per_sec"),
          "english_replay": replay,
          "bpc_before_base_model": before_base, "bpc_before_resized": rz["bpc_resized"], "bpc_after": after,
          "zh_bpc_change": round(after["zh"]["bpc"] - before_base["zh"]["bpc"], 4),
          "en_bpc_change": round(after["en"]["bpc"] - before_base["en"]["bpc"], 4),
          "eval_zh_bpc_curve": _series(recs, "eval_zh_bpc"), "eval_en_bpc_curve": _series(recs, "eval_en_bpc")}
    stage("pretrain", pm)
    sample("pretrained", chat=False)
    print(f"held-out bits/char: zh {before_base['zh']['bpc']:.3f} -> {after['zh']['bpc']:.3f}, "
          f"en {before_base['en']['bpc']:.3f} -> {after['en']['bpc']:.3f}")

    _header("4/8 SFT (LoRA + embed/lm_head) on zh-sft cleaned by `llama-jax data clean`")
    recs, secs = run_stage("sft", sft, "sft")
    stage("sft", {"seconds": secs, "steps": n.sft_steps, "clean": data.clean_report,
                  "clean_report_file": str(out / "data" / "clean" / "report.json"),
                  "train_examples": sum(1 for _ in data.sft_train.open(encoding="utf-8")),
                  "eval_loss_first": _end(recs, "eval_loss", True), "eval_loss": _end(recs, "eval_loss"),
                  "loss": _end(recs, "loss")})
    sample("sft", chat=True)

    _header("5/8 reward model on the zh-pref pairs (SFT backbone)")
    recs, secs = run_stage("rm", reward, "rm", exporter=reward.export)
    stage("rm", {"seconds": secs, "steps": n.rm_steps, "eval_pairs": sum(1 for _ in data.pref_eval.open(encoding="utf-8")),
                 "eval_accuracy_first": _end(recs, "eval_accuracy", True), "eval_accuracy": _end(recs, "eval_accuracy"),
                 "eval_margin": _end(recs, "eval_margin")})

    rm_model = llama_jax.load(models / "rm", head="score")
    off = json.loads((models / "rm" / "config.json").read_text()).get("reward_offset", 0.0)
    qs = data.ppo_eval_prompts
    before = answers(llama_jax.load(models / "sft"), tok, qs, max_new_tokens=32)
    before_score = round(float(rm_scores(rm_model, tok, qs, before).mean() - off), 4)

    def rl_stage(name, module, extra_keys=()):
        """Run PPO / GRPO from the SFT model; held-out RM score and length of greedy replies before / after."""
        recs, secs = run_stage(name, module, name)
        after = answers(llama_jax.load(models / name), tok, qs, max_new_tokens=32)
        stage(name, {"seconds": secs, "iterations": n.ppo_steps, "eval_prompts": len(qs),
                     "rm_score_greedy_before": before_score,
                     "rm_score_greedy_after": round(float(rm_scores(rm_model, tok, qs, after).mean() - off), 4),
                     "reply_chars_before": round(sum(map(len, before)) / len(qs), 1),
                     "reply_chars_after": round(sum(map(len, after)) / len(qs), 1),
                     "score_first": _end(recs, "score", True), "score_last": _end(recs, "score"),
                     "kl_last": _end(recs, "kl"), "response_length_last": _end(recs, "response_length"),
                     **{k: _end(recs, k) for k in extra_keys}})
        sample(name, chat=True)

    _header("6/8 PPO against the reward model (LoRA policy, reference = SFT)")
    rl_stage("ppo", ppo)
    _header("7/8 GRPO against the reward model (G = 4 per prompt, no critic; reference = SFT)")
    rl_stage("grpo", grpo, ("equal_group_frac",))

    _header("8/8 CMMLU / C-Eval (a few subjects) through `llama-jax eval`, samples, plots")
    t0 = time.perf_counter()
    bm = benchmarks(models / "ppo", data_dir, n, out)
    bm["seconds"] = round(time.perf_counter() - t0, 1)
    stage("benchmarks", bm)
    report.data["samples"] = samples

    report.data["plots"] = [str(p) for p in demo_plots(runs, out / "plots")] + \
        [str(plot_bpc(runs, before_base, out / "plots"))]
    report.data["seconds"] = round(time.perf_counter() - t_start, 1)
    report.save()
    print(summary(report.data))
    print(f"report: {out / 'report.json'}   plots: {out / 'plots'}   total {report.data['seconds']:.0f} s")
    return 0


def summary(rep: dict) -> str:
    s = rep["stages"]
    t, p, f, r, q, gr, b = (s.get(k, {}) for k in ("tokenizer", "pretrain", "sft", "rm", "ppo", "grpo", "benchmarks"))
    def g(d, *keys):
        for k in keys:
            d = (d or {}).get(k)
        return d

    num = lambda x, fmt="{:.3f}": "-" if x is None else fmt.format(x)  # noqa: E731
    rows = [
        ("tokenizer", "chars/token, held-out Chinese", num(t.get("chars_per_token_base"), "{:.2f}"),
         num(t.get("chars_per_token_merged"), "{:.2f}")),
        ("tokenizer", "held-out English lines encoded identically", "", f"{t.get('english_identical_lines')}/"
         f"{t.get('english_lines')}"),
        ("pretrain", "bits/char, held-out Chinese (base -> after)", num(g(p, "bpc_before_base_model", "zh", "bpc")),
         num(g(p, "bpc_after", "zh", "bpc"))),
        ("pretrain", "bits/char, held-out English (base -> after)", num(g(p, "bpc_before_base_model", "en", "bpc")),
         num(g(p, "bpc_after", "en", "bpc"))),
        ("sft", "response loss, held-out cleaned instructions", num(f.get("eval_loss_first")), num(f.get("eval_loss"))),
        ("rm", "pair accuracy, held-out pairs", num(r.get("eval_accuracy_first")), num(r.get("eval_accuracy"))),
        ("ppo", "RM score of greedy replies, held-out prompts", num(q.get("rm_score_greedy_before")),
         num(q.get("rm_score_greedy_after"))),
        ("ppo", "KL(policy || SFT), last iteration", "0", num(q.get("kl_last"), "{:.4f}")),
        ("grpo", "RM score of greedy replies, held-out prompts", num(gr.get("rm_score_greedy_before")),
         num(gr.get("rm_score_greedy_after"))),
        ("grpo", "KL(policy || SFT), last iteration", "0", num(gr.get("kl_last"), "{:.4f}")),
        ("eval", "CMMLU accuracy (chance 0.25)", "", num(g(b, "cmmlu", "accuracy"))),
        ("eval", "C-Eval accuracy (chance 0.25)", "", num(g(b, "ceval", "accuracy"))),
    ]
    w = [max(len(str(row[i])) for row in rows + [("stage", "metric", "before", "after")]) for i in range(4)]
    line = lambda row: "  ".join(str(c).ljust(w[i]) if i < 2 else str(c).rjust(w[i]) for i, c in enumerate(row))  # noqa: E731
    out = [line(("stage", "metric", "before", "after")), "  ".join("-" * x for x in w)] + [line(x) for x in rows]
    out += [f"[{x['model']}] {x['prompt']} -> {x['reply']!r}" for x in rep.get("samples", [])]
    return "\n".join(out)

"""`llama-jax demo [--out DIR] [--data DIR] [--base-tokenizer PATH]`: the whole pipeline on CPU.

Tokenizer (train a Chinese BPE, merge it into a base) -> toy Llama -> pretraining -> LoRA SFT ->
reward model -> PPO -> before/after samples, each stage a plain `llama-jax <stage>` run whose
YAML config is written to OUT/configs (so any stage can be rerun or changed by hand).

Default: the built-in synthetic task (llama_jax.synthetic: numbers and dates written in Chinese
characters), so every stage has a true metric: chars/token of the merged tokenizer against the
base, pretraining perplexity on held-out text, SFT and PPO exact-match on held-out questions, RM
accuracy on held-out pairs, reward and KL through PPO.  The base tokenizer is --base-tokenizer,
else LLaMA-2's under --data, else a small byte-fallback BPE trained on the fly on English text
(so Chinese falls back to bytes, as with LLaMA-2).  With --data DIR the CLI runs
llama_jax.demo_real instead: the same method on the real data of DIR from a real pretrained base.

Output: a summary table on the terminal, OUT/report.json (every stage's metrics, written after
each stage), OUT/plots/*.png, and every stage's run directory with its metrics.jsonl.
"""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import llama_jax

from .data.records import ASSISTANT, USER, Conversation
from .data.templates import generation_prompt_ids, get_template
from .export import export
from .generate import generate
from .plots import demo_plots, read_metrics as _metrics
from .rl.reward_model import last_token_scores
from .stages import grpo, ppo, pretrain, reward, sft
from .synthetic import Example, SyntheticTask, colloquial, number_to_en
from .text import load_tokenizer
from .tokenizer.merge import MergeOptions, merge_tokenizers
from .tokenizer.train import train_bpe

TEMPLATE = "llama2-chat"  # no system prompt: short prompts for a toy model

# The toy model every stage shares (vocab set from the merged tokenizer).
MODEL = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


PAIR_KINDS = {"numeral": 1.2, "neighbour": 0.2, "zero": 0.1, "truncated": 0.1, "digits": 0.1, "colloquial": 0.1}


@dataclass
class Sizes:
    """Data and step counts of the built-in run (chosen to fit ~10 minutes on 2 CPU cores)."""
    corpus_lines: int = 4000
    sft_examples: int = 4000
    pref_pairs: int = 16500  # + ~4,000 own-sample pairs: about one epoch of the RM's 640 x 32
    # the SFT model's answers to this many training questions, k each at T = 0.7: every wrong one
    # becomes a pair (correct answer chosen), as InstructGPT's RM data are comparisons of model samples
    rm_sample_questions: int = 3000
    rm_samples_per_question: int = 3
    ppo_prompts: int = 2000
    eval_questions: int = 256
    eval_pairs: int = 400
    pretrain_steps: int = 300
    # the SFT answers written colloquially (synthetic.colloquial: 二零二三年, 两百, 一百十五) with this
    # probability where such a form exists (16 % of the answers at 0.7): the held-out answers the model
    # then writes colloquially are what PPO against the RM and GRPO with the checker fix (docs/rl.md,
    # round 4).  On clean data, 150 steps gave 55.9 % and 300 steps 98.8 % held-out (seed 0), and RL
    # lowered exact-match on average (rounds 1-3)
    sft_colloquial: float = 0.7
    sft_steps: int = 200
    rm_steps: int = 640
    # the RM's training negatives by corruption kind (held-out pairs stay uniform): a uniform mix left
    # the value-level kinds near chance (numeral 58 %, neighbour 60 %, seed 0) while the others were at
    # 100 % after 40 steps (docs/rl.md).  With the colloquial SFT data the SFT model's own wrong answers
    # carry fewer value errors, and numeral weight 0.5 gave 86 % on one-numeral pairs (seed 0), 0.8 85 %,
    # 1.2 93 % (72 held-out pairs of that kind: +-4 %)
    pair_kinds: dict = field(default_factory=lambda: dict(PAIR_KINDS))
    ppo_steps: int = 20
    ppo_critic_warmup: int = 5  # of ppo_steps: critic-only iterations first (value loss 1.95 -> 0.84, seed 0)
    # PPO 25 / GRPO 20 iterations (seed 0, SFT 250 steps): the checker's rollout score levels off after ~9
    # policy iterations (PPO) and ~10 (GRPO)
    grpo_steps: int = 16
    grpo_prompts: int = 64  # per step, x G = 8 samples (at 16, 14 of 16 groups were all-equal: no signal)
    seed: int = 0


@dataclass
class DemoData:
    """Files each stage reads, plus the checkable questions (synthetic task only)."""
    tokenizer_corpus: list[Path]
    tokenizer_eval: list[str]             # held-out lines for chars/token
    pretrain_train: list[Path]
    pretrain_eval: list[Path]
    sft_train: list[Path]
    sft_eval: list[Path]
    pref_train: list[Path]
    pref_eval: list[Path]
    ppo_prompts: list[Path]
    base_tokenizer_corpus: Path | None = None  # text for the on-the-fly base tokenizer
    # the RM's pairs from the SFT model's own wrong samples (written after SFT; built-in task only)
    pref_samples: Path | None = None
    sample_pair_questions: list[Example] = field(default_factory=list)
    eval_questions: list[Example] = field(default_factory=list)
    sample_questions: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- files
def _write_jsonl(path: Path, records) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def _write_lines(path: Path, lines) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)
    return path


def synthetic_data(d: Path, task: SyntheticTask, n: Sizes) -> DemoData:
    """Write the built-in task's files: train split for training, test split for every metric."""
    d.mkdir(parents=True, exist_ok=True)
    s = n.seed
    train_corpus = _write_lines(d / "corpus_train.txt", task.corpus(n.corpus_lines, "train", s))
    eval_corpus = _write_lines(d / "corpus_test.txt", task.corpus(max(50, n.corpus_lines // 40), "test", s))

    def sft(exs, rate=0.0):
        rng = random.Random(f"colloquial:{s}")
        return [{"instruction": e.question, "output": colloquial(e.answer) if rng.random() < rate else e.answer}
                for e in exs]

    def pairs(exs, salt, weights=None):
        rng = random.Random(f"pairs:{salt}:{s}")
        out = []
        for e in exs:
            bad, kind = task.corrupt(e, rng, weights)
            out.append({"prompt": e.question, "chosen": e.answer, "rejected": bad, "corruption": kind})
        return out

    sft_train = _write_jsonl(d / "sft_train.jsonl", sft(task.examples(n.sft_examples, "train", s), n.sft_colloquial))
    sft_eval = _write_jsonl(d / "sft_test.jsonl", sft(task.examples(200, "test", s + 1)))
    pref_train = _write_jsonl(d / "pref_train.jsonl", pairs(task.examples(n.pref_pairs, "train", s + 2), "train",
                                                                 n.pair_kinds))
    pref_eval = _write_jsonl(d / "pref_test.jsonl", pairs(task.examples(n.eval_pairs, "test", s + 3), "test"))
    prompts = _write_jsonl(d / "ppo_prompts.jsonl",
                           [{"instruction": e.question} for e in task.examples(n.ppo_prompts, "train", s + 4)])
    questions = held_out_questions(task, n)
    sample_qs = task.examples(n.rm_sample_questions, "train", s + 6)
    base_corpus = _write_lines(d / "base_tokenizer_corpus.txt", english_corpus(4000, s))
    return DemoData(tokenizer_corpus=[train_corpus], tokenizer_eval=eval_corpus.read_text("utf-8").splitlines(),
                    pretrain_train=[train_corpus], pretrain_eval=[eval_corpus], sft_train=[sft_train],
                    sft_eval=[sft_eval], pref_train=[pref_train], pref_eval=[pref_eval], ppo_prompts=[prompts],
                    base_tokenizer_corpus=base_corpus, eval_questions=questions,
                    pref_samples=d / "pref_train_samples.jsonl", sample_pair_questions=sample_qs,
                    sample_questions=[e.question for e in questions[:4]])


def held_out_questions(task: SyntheticTask, n: Sizes) -> list[Example]:
    """The questions every exact-match of the demo is measured on (test split, never trained on);
    scripts that rerun a stage of a finished demo score on these too (sizes from its report.json)."""
    return task.examples(n.eval_questions, "test", n.seed + 5)


def finished_demo_sizes(demo_dir: Path) -> Sizes:
    """The Sizes of a finished built-in demo (its report.json), or a ValueError naming what is missing."""
    rep = Path(demo_dir) / "report.json"
    if not rep.is_file():
        raise ValueError(f"{demo_dir}: no report.json (the --out of a finished `llama-jax demo`)")
    sizes = json.loads(rep.read_text("utf-8")).get("sizes")
    if not isinstance(sizes, dict) or not sizes.get("eval_questions"):
        raise ValueError(f"{rep}: field 'sizes' is missing or has no eval_questions (a `demo --data` run has no checker)")
    known = {f.name for f in dataclasses.fields(Sizes)}
    return Sizes(**{k: v for k, v in sizes.items() if k in known})


def english_corpus(n_lines: int, seed: int) -> list[str]:
    """Text for the on-the-fly base tokenizer: English, like most of LLaMA-2's training text."""
    rng = random.Random(f"english:{seed}")
    forms = ["{d} is written {e}.", "The number {d} reads {e}.", "We counted {e} ({d}) items in total."]
    return [" ".join(rng.choice(forms).format(d=k, e=number_to_en(k))
                     for k in (rng.randint(0, 99999) for _ in range(4))) for _ in range(n_lines)]


# ----------------------------------------------------------------------------- tokenizer
def count_tokens(sp, lines: list[str]) -> int:
    return sum(len(ids) for ids in sp.encode(lines))


def tokenizer_stage(out: Path, data: DemoData, base: Path | None, zh_vocab: int) -> tuple[Path, dict]:
    """Train the Chinese BPE, merge it into the base (trained here when none is given)."""
    import sentencepiece as spm


    d = out / "tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    base_kind = "given"
    if base is None:
        # the chat template's markers as pieces: byte by byte "[INST]" and " [/INST]" took 15 of the 37
        # tokens of a demo pair (LLaMA-2's own tokenizer writes them in 3-4 pieces)
        base = train_bpe(d / "base", input_files=[data.base_tokenizer_corpus], vocab_size=600,
                         extra={"hard_vocab_limit": False, "byte_fallback": True,
                                "user_defined_symbols": ["[INST]", "[/INST]"]}).model_path
        base_kind = "trained on the fly (English, byte fallback)"
    zh = train_bpe(d / "zh", input_files=data.tokenizer_corpus, vocab_size=zh_vocab,
                   extra={"hard_vocab_limit": False}).model_path
    # <pad> right after the base pieces; vocab rounded up to a multiple of 64 (TPU/GPU-friendly)
    merge_tokenizers(base, zh, d / "merged", MergeOptions(pad_token=True, pad_to_multiple_of=64))
    base_sp = spm.SentencePieceProcessor(model_file=str(base))
    new_sp = spm.SentencePieceProcessor(model_file=str(d / "merged" / "tokenizer.model"))
    m = {"base": str(base), "base_kind": base_kind, "base_vocab": base_sp.get_piece_size(),
         "chinese_vocab": spm.SentencePieceProcessor(model_file=str(zh)).get_piece_size(),
         "merged_vocab": new_sp.get_piece_size(), "pad_id": new_sp.piece_to_id("<pad>"),
         "eval_lines": len(data.tokenizer_eval), "eval_chars": sum(len(x) for x in data.tokenizer_eval),
         "eval_tokens_base": count_tokens(base_sp, data.tokenizer_eval),
         "eval_tokens_merged": count_tokens(new_sp, data.tokenizer_eval)}
    m["chars_per_token_base"] = round(m["eval_chars"] / m["eval_tokens_base"], 4)
    m["chars_per_token_merged"] = round(m["eval_chars"] / m["eval_tokens_merged"], 4)
    m["tokens_merged_over_base"] = round(m["eval_tokens_merged"] / m["eval_tokens_base"], 4)
    return d / "merged", m


# ----------------------------------------------------------------------------- stages
def _write_config(out: Path, name: str, cfg: dict) -> Path:
    d = out / "configs"
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{name}.yaml"
    tmp = p.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    tmp.replace(p)
    return p


def _strs(paths) -> list[str]:
    return [str(Path(p).absolute()) for p in paths]


def stage_configs(out: Path, data: DemoData, tok_dir: Path, tok_m: dict, n: Sizes,
                  ppo_reward: str = "rm") -> dict[str, dict]:
    """The stage configs (plain `llama-jax <stage>` YAML), chained through exported models: pretrain,
    SFT, RM, PPO (against the RM, or the checker with --ppo-reward exact) and, on the built-in task,
    GRPO with the exact-match checker."""
    checkable = bool(data.eval_questions)
    models = out / "models"
    vocab = tok_m["merged_vocab"]
    overrides = dict(MODEL, vocab_size=vocab, pad_token_id=tok_m["pad_id"])
    common_train = {"seed": n.seed, "log_every": 10, "warmup_ratio": 0.05, "schedule": "cosine"}
    ev = lambda files, **kw: {"eval_files": _strs(files)} if files else {"eval_fraction": kw.get("frac", 0.05)}  # noqa: E731
    lora = {"enabled": True, "rank": 16, "alpha": 32, "dropout": 0.0}
    return {
        "pretrain": {
            "model": {"init": "toy", "overrides": overrides},
            "tokenizer": str(tok_dir),
            "data": {"train_files": _strs(data.pretrain_train), **ev(data.pretrain_eval), "block_size": 128},
            "train": {**common_train, "steps": n.pretrain_steps, "batch_size": 16, "lr": 3e-3,
                      "eval_every": max(50, n.pretrain_steps // 6), "eval_batches": 4,
                      "checkpoint_every": n.pretrain_steps},
        },
        "sft": {
            "model": {"init": str(models / "pretrained")},
            "tokenizer": str(tok_dir),
            "lora": {**lora, "trainable_modules": ["embed_tokens", "lm_head"]},
            "data": {"train_files": _strs(data.sft_train), **ev(data.sft_eval), "template": TEMPLATE,
                     "max_length": 128, "batching": "pack", "sample_prompts": data.sample_questions[:2],
                     "sample_max_new_tokens": 24},
            "train": {**common_train, "steps": n.sft_steps, "batch_size": 16, "lr": 2e-3, "weight_decay": 0.0,
                      "eval_every": max(50, n.sft_steps // 3), "eval_batches": 4, "checkpoint_every": n.sft_steps},
        },
        "rm": {
            "model": {"init": str(models / "sft")},
            "tokenizer": str(tok_dir),
            "data": {"train_files": _strs(data.pref_train + ([data.pref_samples] if data.pref_samples else [])),
                     **ev(data.pref_eval, frac=0.1), "template": TEMPLATE,
                     "max_length": 128, "pad_id": tok_m["pad_id"], "pad_to_multiple": 16},
            "rm": {"center_coef": 0.01},
            "train": {**common_train, "steps": n.rm_steps, "batch_size": 32, "lr": 5e-4, "min_lr_ratio": 0.0,
                      "eval_every": max(20, n.rm_steps // 5), "checkpoint_every": n.rm_steps},
        },
        "ppo": {
            "model": {"init": str(models / "sft")},
            "tokenizer": str(tok_dir),
            "lora": lora,
            "data": {"prompt_files": _strs(data.ppo_prompts), "template": TEMPLATE, "max_prompt_length": 48},
            "ppo": {**({"reward_model": str(models / "rm")} if ppo_reward == "rm" else
                       {"reward_fn": "llama_jax.synthetic:exact_match_reward",
                        "reward_fn_args": {"tokenizer": str(tok_dir)}, "value_model": str(models / "rm")}),
                    **({"check_fn": "llama_jax.synthetic:exact_match_reward",
                        "check_fn_args": {"tokenizer": str(tok_dir)}} if ppo_reward == "rm" and checkable else {}),
                    # rollouts at T=0.7, near the greedy answers the demo scores (at T=1 the sampled
                    # reward rose while greedy exact-match fell: 22.3 -> 16.4 %, docs/demo.md)
                    "max_new_tokens": 24, "temperature": 0.7, "epochs": 2,
                    "minibatches": 2, "kl_coef": 0.05, "missing_eos_score": -1.0,
                    "critic_warmup": n.ppo_critic_warmup,
                    # against the RM: normalised scores clipped, beta adapted toward a KL target, T = 0.4
                    # and the critic from the policy's backbone (seed 0, held-out greedy exact-match from
                    # 55.9 %: T = 0.7 47.7 %, T = 0.4 51.2 %; with the final RM, critic from the RM 53.5 %,
                    # from the policy 54.3 %; docs/rl.md)
                    **({"score_clip": 3.0, "kl_coef": 0.1, "adaptive_kl": True, "kl_target": 0.3,
                        "kl_horizon": 128, "temperature": 0.4, "value_model": "policy"} if ppo_reward == "rm" else {})},
            "train": {**common_train, "steps": n.ppo_steps, "batch_size": 64,
                      "lr": 2e-4 if ppo_reward == "rm" else 5e-4, "warmup_ratio": 0.0,
                      "schedule": "constant", "log_every": 2, "checkpoint_every": n.ppo_steps},
        },
        **({"grpo": {
            "model": {"init": str(models / "sft")},
            "tokenizer": str(tok_dir),
            "lora": lora,
            "data": {"prompt_files": _strs(data.ppo_prompts), "template": TEMPLATE, "max_prompt_length": 48},
            "grpo": {"reward_fn": "llama_jax.synthetic:exact_match_reward",
                     "reward_fn_args": {"tokenizer": str(tok_dir)}, "group_size": 8, "max_new_tokens": 24,
                     # T = 0.7, 64 prompts x 8, lr 2e-4 (60 iterations: the best of twelve configs tried from
                     # the seed-0 SFT model (55.9 -> 60.2 % held out; T = 0.4 / 1.0, lr 5e-4 / 1e-3 / 3e-3,
                     # 16 / 32 prompts, a graded reward, embed / lm_head trained all ended lower, docs/rl.md);
                     # 20 iterations to keep the demo within 10 minutes (50: 55.9 -> 55.1 %, 12.8 min in all)
                     # 32-row minibatches: the kept groups' rows fill the first ones, the rest are skipped
                     # (update 3.7 -> 2.0 s per iteration on seed 0, ~60 % of groups all-equal)
                     "temperature": 0.7, "epochs": 1, "minibatches": max(1, n.grpo_prompts * 8 // 32),
                     "clip_low": 0.2, "clip_high": 0.28,
                     "scale_rewards": True, "kl_coef": 0.02, "kl_in": "loss", "kl_estimator": "k3",
                     "aggregation": "token", "drop_equal_groups": True, "missing_eos_score": -1.0},
            "train": {**common_train, "steps": n.grpo_steps, "batch_size": n.grpo_prompts, "lr": 2e-4, "warmup_ratio": 0.0,
                      "schedule": "constant", "log_every": 2, "checkpoint_every": n.grpo_steps},
        }} if checkable else {}),
    }




def _last(recs: list[dict], key: str):
    vals = [r[key] for r in recs if key in r]
    return vals[-1] if vals else None


def _first(recs: list[dict], key: str):
    vals = [r[key] for r in recs if key in r]
    return vals[0] if vals else None


def hacking_signal(recs: list[dict]) -> dict | None:
    """Reward hacking, seen in PPO's own log: the reward model's score (`score`) rising while the
    checker that is never trained on (`check_score`, ppo.check_fn) falls.  Least-squares slopes per
    iteration over the logged steps; `hacking` when the first is > 0 and the second < 0."""
    import numpy as np

    pts = [(r["step"], r["score"], r["check_score"]) for r in recs if "check_score" in r and "score" in r]
    if len(pts) < 3:
        return None
    x, s, c = (np.asarray(v, np.float64) for v in zip(*pts))
    ss, cs = float(np.polyfit(x, s, 1)[0]), float(np.polyfit(x, c, 1)[0])
    return {"score_slope": round(ss, 5), "check_slope": round(cs, 5), "hacking": bool(ss > 0 and cs < 0)}


# ----------------------------------------------------------------------------- evaluation
def _prompt_ids(tok, question: str) -> list[int]:

    return generation_prompt_ids(Conversation(None, [(USER, question)]), tok, TEMPLATE)


def answers(model, tok, questions: list[str], max_new_tokens: int = 24, temperature: float = 0.0,
            seed: int = 0) -> list[str]:
    """Greedy (or sampled) replies to each question through the chat template, EOS cut."""
    ids = [_prompt_ids(tok, q) for q in questions]
    outs = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                    pad_id=model.config.pad_token_id, eos_ids=[tok.eos_token_id])
    return [tok.decode(o, skip_special_tokens=True).strip() for o in outs]


def rm_scores(rm, tok, prompts: list[str], replies: list[str]):
    """Raw RM scores of (question, reply) pairs through the chat template, one forward."""
    import jax.numpy as jnp
    import numpy as np


    tpl = get_template(TEMPLATE)
    seqs = []
    for q, a in zip(prompts, replies):
        p, r = tpl.exchanges(Conversation(None, [(USER, q), (ASSISTANT, a)]), tok)[0]
        seqs.append(p + r)
    T = -(-max(len(x) for x in seqs) // 16) * 16
    ids = np.full((len(seqs), T), rm.config.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for i, x in enumerate(seqs):
        ids[i, :len(x)], mask[i, :len(x)] = x, 1
    return np.asarray(last_token_scores(rm, jnp.asarray(ids), jnp.asarray(mask)))


def pair_accuracy_by_kind(rm, tok, pairs_file: Path) -> dict:
    """Held-out RM accuracy per corruption kind (the `corruption` field of the synthetic pairs)."""
    recs = [json.loads(line) for line in pairs_file.read_text("utf-8").splitlines() if line.strip()]
    qs = [r["prompt"] for r in recs]
    good = rm_scores(rm, tok, qs, [r["chosen"] for r in recs])
    bad = rm_scores(rm, tok, qs, [r["rejected"] for r in recs])
    out: dict[str, list] = {}
    for r, g, b in zip(recs, good, bad):
        out.setdefault(r.get("corruption", "?"), []).append(bool(g > b))
    return {k: {"accuracy": round(sum(v) / len(v), 4), "pairs": len(v)} for k, v in sorted(out.items())}


def own_sample_pairs(policy, tok, questions: list[Example], k: int, temperature: float = 0.7,
                     seed: int = 0) -> list[dict]:
    """Preference pairs from the policy's own mistakes: k sampled answers per question, each wrong
    (non-empty) one the rejected side against the correct answer (`corruption: "sample"`).  The
    synthetic corruptions alone left the RM at chance on the SFT model's real errors (0.505 right over
    wrong, seed 0); with these pairs 0.952 (docs/rl.md)."""
    qs = [e.question for e in questions]
    out = []
    for i in range(k):
        for e, r in zip(questions, answers(policy, tok, qs, temperature=temperature, seed=seed + 1000 + i)):
            if r and r != e.answer:
                out.append({"prompt": e.question, "chosen": e.answer, "rejected": r, "corruption": "sample"})
    return out


def rm_on_policy_samples(policy, rm, tok, questions: list[Example], k: int = 8, temperature: float = 0.7,
                         seed: int = 0) -> dict:
    """What RL against the RM can gain, measured before RL: k sampled answers of `policy` per held-out
    question, scored by the checker and the RM.  pass_at_1 / pass_at_k (some sample right: the ceiling
    of any sharpening at this temperature), best_of_k_rm (exact-match of the RM's favourite sample:
    what optimising the RM's preference among these samples gives), pairwise_accuracy (the RM scores
    a right sample above a wrong one of the same question; the synthetic pairs' accuracy can be high
    while this is at chance: 0.505 with uniform negatives, seed 0, docs/rl.md)."""
    import numpy as np

    qs = [e.question for e in questions]
    reps = [answers(policy, tok, qs, temperature=temperature, seed=seed + i) for i in range(k)]
    hits = np.array([[r == e.answer for r, e in zip(rs, questions)] for rs in reps])      # [k, Q]
    sc = np.stack([np.asarray(rm_scores(rm, tok, qs, rs)) for rs in reps])               # [k, Q]
    better = (sc[:, None, :] > sc[None, :, :]) & hits[:, None, :] & ~hits[None, :, :]     # [a right, b wrong, q]
    n_pairs = int((hits[:, None, :] & ~hits[None, :, :]).sum())
    best = sc.argmax(0)
    return {"k": k, "temperature": temperature, "pass_at_1": round(float(hits.mean()), 4),
            f"pass_at_{k}": round(float(hits.any(0).mean()), 4),
            f"best_of_{k}_rm": round(float(hits[best, np.arange(len(qs))].mean()), 4),
            "pairwise_accuracy": round(float(better.sum()) / n_pairs, 4) if n_pairs else None, "pairs": n_pairs}


def exact_match(model, tok, questions: list[Example], **kw) -> tuple[float, list[str]]:
    replies = answers(model, tok, [e.question for e in questions], **kw)
    return sum(r == e.answer for r, e in zip(replies, questions)) / len(questions), replies


def colloquial_share(questions: list[Example], replies: list[str]) -> dict:
    """Of the questions whose answer has a colloquial form (synthetic.colloquial), the share answered
    with it (the habit the SFT data teach and the checker rejects) and the share answered exactly."""
    has = [(e, r) for e, r in zip(questions, replies) if colloquial(e.answer) != e.answer]
    if not has:
        return {"questions": 0, "colloquial": None, "exact_match": None}
    return {"questions": len(has), "colloquial": round(sum(r == colloquial(e.answer) for e, r in has) / len(has), 4),
            "exact_match": round(sum(r == e.answer for e, r in has) / len(has), 4)}


# ----------------------------------------------------------------------------- the pipeline
SIZES = {
    "default": Sizes(),
    # a smoke run of every stage (tests): same code, a few steps each
    "tiny": Sizes(corpus_lines=300, sft_examples=200, pref_pairs=128, ppo_prompts=64, eval_questions=32,
                  eval_pairs=64, rm_sample_questions=32, rm_samples_per_question=2, pretrain_steps=20, sft_steps=10,
                  rm_steps=8, ppo_steps=3, ppo_critic_warmup=1, grpo_steps=2, grpo_prompts=8),  # 8 x G = 64 rollouts: the shapes of the tiny PPO rollouts
}


class Report:
    """report.json, rewritten (atomically) after every stage so a stopped run still has one."""

    def __init__(self, path: Path, head: dict):
        self.path, self.data = path, {**head, "stages": {}}

    def stage(self, name: str, metrics: dict):
        self.data["stages"][name] = metrics
        self.save()

    def save(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.path)


def _banner(text: str):
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def _resolve_base(args, data_dir: Path | None) -> Path | None:
    if args.base_tokenizer:
        p = Path(args.base_tokenizer)
        if not p.exists():
            raise FileNotFoundError(f"--base-tokenizer {p}: not found")
        return p
    if data_dir is not None:
        p = data_dir / "llama2-tokenizer" / "tokenizer.model"
        if p.exists():
            return p
    return None


def run_demo(args) -> int:


    t_start = time.perf_counter()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    n = SIZES[getattr(args, "size", "default") or "default"]
    if getattr(args, "seed", None) is not None:
        n = dataclasses.replace(n, seed=int(args.seed))
    data_dir = Path(args.data) if args.data else None
    if data_dir is not None and not data_dir.is_dir():
        raise FileNotFoundError(f"--data {data_dir}: not a directory")
    task = SyntheticTask()
    data = synthetic_data(out / "data", task, n)  # --data runs llama_jax.demo_real (cli dispatch)
    checkable = bool(data.eval_questions)
    report = Report(out / "report.json", {
        "task": "synthetic: numbers and dates in Chinese characters (llama_jax.synthetic)" if checkable
        else f"real data under {data_dir}", "sizes": n.__dict__, "model": MODEL})
    runs, models = out / "runs", out / "models"

    _banner("1/6 tokenizer: train a Chinese BPE, merge it into the base")
    t0 = time.perf_counter()
    tok_dir, tm = tokenizer_stage(out, data, _resolve_base(args, data_dir), 200 if checkable else 4000)
    tm["seconds"] = round(time.perf_counter() - t0, 1)
    report.stage("tokenizer", tm)
    print(f"base {tm['base_vocab']} pieces ({tm['base_kind']}) + Chinese -> {tm['merged_vocab']} pieces; "
          f"chars/token on held-out text {tm['chars_per_token_base']:.2f} -> {tm['chars_per_token_merged']:.2f}")
    tok = load_tokenizer(tok_dir)
    # PPO against the reward model (the method reproduced); the checker drives GRPO on the built-in task
    reward_kind = args.ppo_reward if args.ppo_reward != "auto" else "rm"
    if reward_kind == "exact" and not checkable:
        raise ValueError("--ppo-reward exact needs the built-in task (it checks answers); use rm with --data")
    stage_cfgs = stage_configs(out, data, tok_dir, tm, n, reward_kind)
    cfgs = {k: _write_config(out, k, v) for k, v in stage_cfgs.items()}

    def run_stage(name, module, export_to=None, exporter=export):
        t0 = time.perf_counter()
        if (runs / name).exists():  # a fresh run: the loop would otherwise resume from the old one
            shutil.rmtree(runs / name)
        module.run(cfgs[name], out=str(runs / name))
        if export_to is not None:
            exporter(runs / name, models / export_to)
        return _metrics(runs / name), round(time.perf_counter() - t0, 1)

    def em(model_dir: Path, **kw):
        return exact_match(llama_jax.load(model_dir), tok, data.eval_questions, **kw)

    _banner("2/6 continued pretraining (toy Llama, random init)")
    recs, secs = run_stage("pretrain", pretrain, "pretrained")
    pm = {"seconds": secs, "steps": n.pretrain_steps, "eval_ppl_first": _first(recs, "eval_ppl"),
          "eval_ppl": _last(recs, "eval_ppl"), "loss": _last(recs, "loss"),
          "tokens_per_sec": _last(recs, "tokens_per_sec")}
    report.stage("pretrain", pm)

    _banner("3/6 SFT with LoRA (+ embed_tokens / lm_head in full)")
    sm = {}
    if checkable:
        sm["exact_match_before"], _ = em(models / "pretrained")
    recs, secs = run_stage("sft", sft, "sft")
    sm.update({"seconds": secs, "steps": n.sft_steps, "loss": _last(recs, "loss"),
               "eval_loss": _last(recs, "eval_loss")})
    if checkable:
        sm["exact_match"], sft_replies = em(models / "sft")
        sm["colloquial_questions"] = colloquial_share(data.eval_questions, sft_replies)
    report.stage("sft", sm)

    _banner("4/6 reward model (pairwise, on the SFT backbone)")
    own, sft_model = [], llama_jax.load(models / "sft") if checkable else None
    if data.pref_samples is not None:
        t0 = time.perf_counter()
        own = own_sample_pairs(sft_model, tok, data.sample_pair_questions,
                               n.rm_samples_per_question, seed=n.seed)
        _write_jsonl(data.pref_samples, own)
        if not own:  # an SFT model that never errs (or never answers): the synthetic pairs alone
            stage_cfgs["rm"]["data"]["train_files"] = _strs(data.pref_train)
            cfgs["rm"] = _write_config(out, "rm", stage_cfgs["rm"])
        print(f"rm: {len(own)} pairs from the SFT model's wrong answers ({n.rm_samples_per_question} samples x "
              f"{len(data.sample_pair_questions)} training questions, {time.perf_counter() - t0:.0f} s)")
    recs, secs = run_stage("rm", reward, "rm", exporter=reward.export)
    rm = {"seconds": secs, "steps": n.rm_steps, "own_sample_pairs": len(own), "eval_accuracy": _last(recs, "eval_accuracy"),
          "eval_accuracy_first": _first(recs, "eval_accuracy"), "eval_margin": _last(recs, "eval_margin"),
          "eval_pairs_file": _strs(data.pref_eval)}
    rm_model = llama_jax.load(models / "rm", head="score")
    if checkable:
        rm["eval_accuracy_by_corruption"] = pair_accuracy_by_kind(rm_model, tok, data.pref_eval[0])
        rm["on_sft_samples"] = rm_on_policy_samples(sft_model, rm_model, tok,
                                                    data.eval_questions, seed=n.seed)
    report.stage("rm", rm)

    _banner(f"5/6 PPO (LoRA policy, reference = LoRA off; reward: "
            f"{'the RM, critic from the policy' if reward_kind == 'rm' else 'exact-match checker, critic from the RM'})")
    recs, secs = run_stage("ppo", ppo, "ppo")
    qm = {"seconds": secs, "iterations": n.ppo_steps, "score_first": _first(recs, "score"),
          "score_last": _last(recs, "score"), "kl_last": _last(recs, "kl"), "kl": _last(recs, "kl"),
          "response_length_last": _last(recs, "response_length"), "beta_last": _last(recs, "beta"),
          "check_score_first": _first(recs, "check_score"), "check_score_last": _last(recs, "check_score")}
    qm["reward"] = reward_kind
    qm["hacking_signal"] = hacking_signal(recs)
    off = json.loads((models / "rm" / "config.json").read_text()).get("reward_offset", 0.0)
    if checkable:
        qs = [e.question for e in data.eval_questions]
        qm["exact_match_before"], before = sm["exact_match"], sft_replies
        qm["exact_match"], after = em(models / "ppo")
        qm["colloquial_questions"] = colloquial_share(data.eval_questions, after)
        # the reward model's view of the greedy answers, before and after PPO (normalised scores)
        sm["rm_score"] = qm["rm_score_greedy_before"] = float(rm_scores(rm_model, tok, qs, before).mean() - off)
        qm["rm_score"] = qm["rm_score_greedy"] = float(rm_scores(rm_model, tok, qs, after).mean() - off)
        sm["kl"] = 0.0
        report.stage("sft", sm)
    report.stage("ppo", qm)

    if "grpo" in cfgs:
        _banner("6/6 GRPO (LoRA policy from the SFT model, G = 8 samples per prompt, exact-match checker reward)")
        recs, secs = run_stage("grpo", grpo, "grpo")
        gm = {"seconds": secs, "iterations": n.grpo_steps, "score_first": _first(recs, "score"),
              "score_last": _last(recs, "score"), "kl": _last(recs, "kl"), "reward": "exact",
              "equal_group_frac_last": _last(recs, "equal_group_frac"),
              "response_length_last": _last(recs, "response_length"),
              "exact_match_before": sm["exact_match"]}
        gm["exact_match"], g_after = em(models / "grpo")
        gm["colloquial_questions"] = colloquial_share(data.eval_questions, g_after)
        gm["rm_score"] = float(rm_scores(rm_model, tok, [e.question for e in data.eval_questions], g_after).mean() - off)
        report.stage("grpo", gm)

    samples = []
    for stage in ("pretrained", "sft", "ppo") + (("grpo",) if "grpo" in cfgs else ()):
        replies = answers(llama_jax.load(models / stage), tok, data.sample_questions)
        samples += [{"model": stage, "question": q, "reply": r} for q, r in zip(data.sample_questions, replies)]
    if checkable:
        truth = {e.question: e.answer for e in data.eval_questions}
        for s in samples:
            s["correct"] = truth.get(s["question"])
    report.data["samples"] = samples
    report.data["seconds"] = round(time.perf_counter() - t_start, 1)
    report.save()


    report.data["plots"] = [str(p) for p in demo_plots(runs, out / "plots", report.data["stages"])]
    report.save()
    print(summary_table(report.data))
    print(f"report: {out / 'report.json'}   plots: {out / 'plots'}   total {report.data['seconds']:.0f} s")
    return 0


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def _sample_rows(o: dict | None) -> list[tuple]:
    if not o:
        return []
    k = o["k"]
    return [("rm", "right over wrong SFT sample, same question", "-", _pct(o.get("pairwise_accuracy"))),
            ("rm", f"exact-match: one SFT sample -> RM's best of {k} / any of {k}", _pct(o.get("pass_at_1")),
             f"{_pct(o.get(f'best_of_{k}_rm'))} / {_pct(o.get(f'pass_at_{k}'))}")]


def summary_table(rep: dict) -> str:
    s = rep["stages"]
    t, p, f, r, q = (s.get(k, {}) for k in ("tokenizer", "pretrain", "sft", "rm", "ppo"))
    c0 = (f.get("colloquial_questions") or {}).get("colloquial")
    rows = [
        ("tokenizer", "chars/token, held-out text", _num(t.get("chars_per_token_base"), "{:.2f}"),
         _num(t.get("chars_per_token_merged"), "{:.2f}")),
        ("pretrain", "perplexity, held-out text", _num(p.get("eval_ppl_first"), "{:.1f}"), _num(p.get("eval_ppl"), "{:.2f}")),
        ("sft", "exact-match, held-out questions", _pct(f.get("exact_match_before")), _pct(f.get("exact_match"))),
        *([("sft", "colloquial answers, held-out questions that have a colloquial form", "-", _pct(c0))]
          if c0 is not None else []),
        ("rm", "accuracy, held-out pairs", _pct(r.get("eval_accuracy_first")), _pct(r.get("eval_accuracy"))),
        *_sample_rows(r.get("on_sft_samples")),
        ("ppo", "exact-match, held-out questions", _pct(q.get("exact_match_before")), _pct(q.get("exact_match"))),
        ("ppo", f"reward of rollouts ({'RM score' if q.get('reward') == 'rm' else 'exact-match checker'})",
         _num(q.get("score_first")), _num(q.get("score_last"))),
        ("ppo", "RM score of greedy answers, held-out", _num(q.get("rm_score_greedy_before")),
         _num(q.get("rm_score_greedy"))),
        ("ppo", "KL(policy || reference)", "0", _num(q.get("kl_last"), "{:.4f}")),
    ]
    if c0 is not None:
        rows.append(("ppo", "colloquial answers (same questions)", _pct(c0),
                     _pct((q.get("colloquial_questions") or {}).get("colloquial"))))
    if q.get("check_score_first") is not None:
        rows.append(("ppo", "checker on rollouts (never trained on)", _num(q.get("check_score_first")),
                     _num(q.get("check_score_last"))))
    g = s.get("grpo")
    if g:
        rows += [("grpo", "exact-match, held-out questions", _pct(g.get("exact_match_before")), _pct(g.get("exact_match"))),
                 ("grpo", "checker reward of rollouts", _num(g.get("score_first")), _num(g.get("score_last"))),
                 ("grpo", "RM score of greedy answers, held-out", _num(f.get("rm_score")), _num(g.get("rm_score"))),
                 ("grpo", "KL(policy || reference)", "0", _num(g.get("kl"), "{:.4f}"))]
        if c0 is not None:
            rows.append(("grpo", "colloquial answers (same questions)", _pct(c0),
                         _pct((g.get("colloquial_questions") or {}).get("colloquial"))))
    w = [max(len(str(row[i])) for row in rows + [("stage", "metric", "before", "after")]) for i in range(4)]
    line = lambda row: "  ".join(str(c).ljust(w[i]) if i < 2 else str(c).rjust(w[i]) for i, c in enumerate(row))  # noqa: E731
    out = [line(("stage", "metric", "before", "after")), "  ".join("-" * x for x in w)] + [line(r) for r in rows]
    for smp in rep.get("samples", []):
        mark = "" if smp.get("correct") is None else ("  ✓" if smp["reply"] == smp["correct"] else f"  ✗ ({smp['correct']})")
        out.append(f"[{smp['model']}] {smp['question']} -> {smp['reply']}{mark}")
    return "\n".join(out)

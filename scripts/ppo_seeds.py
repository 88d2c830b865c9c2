"""PPO end to end on the verifiable toy task over several seeds: does the *true* reward rise on
held-out prompts, and at what KL?

    .venv/bin/python scripts/ppo_seeds.py [--config configs/toy/ppo.yaml] [--seeds 0,1,2]
        [--out runs/ppo-seeds] [--json runs/ppo-seeds/results.json] [--fixed-init] [key=value ...]

For each seed the script runs the real PPO stage (`stages.ppo.run_config`, the code behind
`llama-jax ppo`) on the config with `train.seed=SEED`, then evaluates the initial policy (the
stage's reference: the frozen copy of the initial weights) and the final policy on

* held-out prompts: 64 prompts of the training distribution (BOS + 2-4 content tokens 3..15)
  that are not training prompts (`--train-prompts N` replaces the config's 8 by N random ones), split into those whose last token is also the last token of some
  training prompt ("seen target") and those whose last token never is ("unseen target");
* the training prompts.

Metrics, per prompt set and policy (all with the stage's own scoring: the config's reward function
on the response, `ppo.missing_eos_score` for a response with no EOS within `ppo.max_new_tokens`):
* greedy decoding: mean reward and exact match (response == [the prompt's last token, EOS]);
* sampled decoding at the training temperature: mean reward over `--samples` samples per prompt
  (Monte Carlo), and the exact-match *probability*, computed exactly as
  pi(last token | prompt) * pi(EOS | prompt, last token) by one teacher-forced pass;
* KL(pi_final || pi_init) per response on held-out prompts: the mean over the sampled responses of
  sum_t log pi_final(y_t) - log pi_init(y_t) (k1, unbiased), and the training log's last `kl`.

Seeds and the initial ("SFT") policy: in the toy config `model.init` is a preset, initialised from
`train.seed`, so by default a seed changes both the initial policy and PPO's sampling /
minibatch RNG (each seed is an independent replicate of init + PPO).  `--fixed-init` instead
saves the seed-0 initial model once and starts every seed from it (only PPO's randomness varies).

Mean ± std over seeds use the sample standard deviation (ddof = 1).  A seed whose run directory
already holds a finished run is not retrained: the stage resumes at its last checkpoint and the
script only evaluates it (`resumed` in the JSON).
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import llama_jax  # noqa: E402
from llama_jax.generate import SamplingParams, decode, left_pad, prefill  # noqa: E402
from llama_jax.rl import ppo_math, rollout  # noqa: E402
from llama_jax.stages import ppo  # noqa: E402
from llama_jax.train.run import build_mesh, build_model  # noqa: E402
from llama_jax.train.config import load_config  # noqa: E402

CONTENT = range(3, 16)  # the toy's content tokens (0 pad, 1 BOS, 2 EOS)


# ----------------------------------------------------------------------------- prompts
def random_prompts(n, seed, exclude=()):
    """n distinct prompts like the toy's (BOS + 2..4 content tokens), none in `exclude`."""
    rng = np.random.default_rng(seed)
    seen = {tuple(p) for p in exclude}
    out = []
    while len(out) < n:
        p = (1, *(int(t) for t in rng.choice(list(CONTENT), size=int(rng.integers(2, 5)))))
        if p not in seen:
            seen.add(p)
            out.append(list(p))
    return out


# ----------------------------------------------------------------------------- evaluation
class Evaluator:
    """Greedy / sampled decoding and exact log-probs of a policy on a fixed prompt set."""

    def __init__(self, cfg, trainer, prompts, samples: int):
        pc = cfg.ppo
        self.N, self.T = pc.max_new_tokens, pc.temperature
        self.miss = pc.missing_eos_score
        self.reward_fn = rollout.get_reward_fn(pc.reward_fn)
        self.eos, self.pad = trainer.eos_ids, trainer.pad_id
        self.config = trainer.config
        self.prompts = prompts
        ids, mask = left_pad(prompts, self.pad)
        self.ids, self.mask = jnp.asarray(ids), jnp.asarray(mask)
        self.K = samples
        self.rep_ids, self.rep_mask = jnp.repeat(self.ids, samples, 0), jnp.repeat(self.mask, samples, 0)
        self.last = np.asarray([p[-1] for p in prompts])
        # the exact-match response: [last token, EOS, pad ...]
        em = np.full((len(prompts), self.N), self.pad, np.int32)
        em[:, 0], em[:, 1] = self.last, self.eos[0]
        self.em_tokens = jnp.asarray(em)

    def _scores(self, prompt_ids, tokens):
        mask, has_eos = ppo_math.response_mask(jnp.asarray(tokens), self.eos)
        r = np.asarray(self.reward_fn(np.asarray(prompt_ids), np.asarray(tokens), np.asarray(mask)), np.float64)
        if self.miss is not None:
            r = np.where(np.asarray(has_eos), r, float(self.miss))
        return r, np.asarray(mask), np.asarray(has_eos)

    def _exact(self, tokens, last):
        t = np.asarray(tokens)
        return (t[:, 0] == last) & np.isin(t[:, 1], self.eos)

    def greedy(self, model):
        graphdef, state = nnx.split(model)
        cache = rollout.init_cache(self.config, len(self.prompts), self.ids.shape[1] + self.N)
        logits, cache = prefill(graphdef, state, self.ids, self.mask, cache)
        pos = jnp.sum(self.mask, -1).astype(jnp.int32)
        tokens, _ = decode(graphdef, state, cache, logits, pos, jax.random.key(0),
                           SamplingParams(self.N, 0.0, 0, 1.0), tuple(self.eos), int(self.pad), None)
        r, _, _ = self._scores(self.ids, tokens)
        return r, self._exact(tokens, self.last).astype(np.float64)

    def sample(self, model, seed):
        graphdef, state = nnx.split(model)
        tokens = rollout.sample_responses(graphdef, state, self.config, self.rep_ids, self.rep_mask,
                                          jax.random.key(seed), max_new_tokens=self.N, temperature=self.T,
                                          eos_ids=self.eos, pad_id=self.pad)
        r, mask, _ = self._scores(self.rep_ids, tokens)
        return np.asarray(tokens), r.reshape(-1, self.K), mask

    def seq_logprob(self, model, tokens, prompt_ids, prompt_mask):
        """log pi(response) per row at the sampling temperature (the stage's log-prob function)."""
        mask, _ = ppo_math.response_mask(jnp.asarray(tokens), self.eos)
        ids, attn = rollout.sequence(prompt_ids, prompt_mask, jnp.asarray(tokens), mask)
        lp = _logprobs(*nnx.split(model), ids, attn, jnp.asarray(tokens), self.T)
        return np.asarray(jnp.sum(lp * mask, -1), np.float64)

    def exact_match_prob(self, model):
        return np.exp(self.seq_logprob(model, self.em_tokens, self.ids, self.mask))


@functools.partial(jax.jit, static_argnums=(0, 5))
def _logprobs(graphdef, state, ids, attn, tokens, temperature):
    return rollout.response_logprobs(nnx.merge(graphdef, state), ids, attn, tokens, temperature)[0]


def evaluate(ev: Evaluator, init_model, final_model, seed: int) -> dict:
    out = {}
    for name, model in (("init", init_model), ("final", final_model)):
        g_r, g_em = ev.greedy(model)
        tokens, s_r, _ = ev.sample(model, seed)
        em_p = ev.exact_match_prob(model)
        out[name] = {"greedy_reward": g_r, "greedy_exact": g_em, "sampled_reward": s_r.mean(1),
                     "sampled_exact_prob": em_p}
        if name == "final":  # KL(final || init) from the final policy's own samples (k1, unbiased)
            lf = ev.seq_logprob(final_model, tokens, ev.rep_ids, ev.rep_mask)
            li = ev.seq_logprob(init_model, tokens, ev.rep_ids, ev.rep_mask)
            out["kl_final_init"] = (lf - li).reshape(-1, ev.K).mean(1)
    return out


def summarise(per_prompt: dict, rows) -> dict | None:
    """Means over the prompts in `rows` (a boolean mask), init / final / gain; None if no rows."""
    if not rows.any():
        return None
    s = {}
    for k in ("greedy_reward", "greedy_exact", "sampled_reward", "sampled_exact_prob"):
        a, b = float(per_prompt["init"][k][rows].mean()), float(per_prompt["final"][k][rows].mean())
        s[k] = {"init": a, "final": b, "gain": b - a}
    s["kl_final_init"] = float(per_prompt["kl_final_init"][rows].mean())
    s["n_prompts"] = int(rows.sum())
    return s


def mean_std(xs):
    return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "toy" / "ppo.yaml"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/ppo-seeds", help="one run directory per seed under this")
    ap.add_argument("--json", default=None, help="results file (default OUT/results.json)")
    ap.add_argument("--samples", type=int, default=64, help="sampled responses per prompt for the MC metrics")
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--fixed-init", action="store_true", help="start every seed from the seed-0 initial model")
    ap.add_argument("--train-prompts", type=int, default=0,
                    help="replace the config's prompts by this many random ones (same distribution; 0: keep)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value config overrides (applied to every seed)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    base = ["train.progress=false", "train.checkpoint_every=0", *args.overrides]
    if args.train_prompts:
        base.append(f"data.prompt_ids={json.dumps(random_prompts(args.train_prompts, 4321))}")
    if args.fixed_init:
        cfg0 = load_config(ppo.PPOConfig, args.config, base + ["train.seed=0"])
        init_dir = out / "init-seed0"
        if not (init_dir / "config.json").exists():  # exactly the stage's seed-0 initial policy
            llama_jax.save_hf(build_model(cfg0, build_mesh(cfg0), None), init_dir)
        base.append(f"model.init={init_dir}")

    path = Path(args.json) if args.json else out / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    results, t0 = {"seeds": {}}, time.time()
    for seed in seeds:
        cfg = load_config(ppo.PPOConfig, args.config, base + [f"train.seed={seed}"])
        run_dir = out / f"seed{seed}"
        # a finished run is resumed at its last checkpoint (nothing retrained) and only evaluated
        resumed = (run_dir / "checkpoints").exists()
        ts = time.time()
        res = ppo.run_config(cfg, str(run_dir))
        train_s = time.time() - ts
        tr = res["trainer"]
        train_prompts = [list(map(int, p)) for p in cfg.data.prompt_ids]
        held = random_prompts(args.heldout, 1234, exclude=train_prompts)
        train_last = {p[-1] for p in train_prompts}
        init_model, final_model = tr.reference_model(tr.state), res["model"]
        ev_h = Evaluator(cfg, tr, held, args.samples)
        ev_t = Evaluator(cfg, tr, train_prompts, args.samples)
        per_h = evaluate(ev_h, init_model, final_model, seed=10_000 + seed)
        per_t = evaluate(ev_t, init_model, final_model, seed=20_000 + seed)
        seen = np.asarray([p[-1] in train_last for p in held])
        with open(run_dir / "metrics.jsonl") as f:
            metrics = [json.loads(line) for line in f]
        rec = {"heldout": summarise(per_h, np.ones(len(held), bool)),
               "heldout_seen_target": summarise(per_h, seen),
               "heldout_unseen_target": summarise(per_h, ~seen),
               "train_prompts": summarise(per_t, np.ones(len(train_prompts), bool)),
               "train_log_last": {k: metrics[-1][k] for k in ("step", "score", "kl", "eos_rate", "response_length")},
               "train_log_first": {k: metrics[0][k] for k in ("step", "score", "kl", "eos_rate", "response_length")},
               "train_s": train_s, "resumed": resumed,
               "median_iter_s": float(np.median([m["iter_time_s"] for m in metrics[1:] or metrics]))}
        results["seeds"][seed] = rec
        path.write_text(json.dumps(results, indent=2, default=float) + "\n")  # per seed, in case a later one fails
        h = rec["heldout"]
        print(f"seed {seed}: held-out greedy reward {h['greedy_reward']['init']:.3f} -> "
              f"{h['greedy_reward']['final']:.3f}, "
              f"exact {h['greedy_exact']['init']:.3f} -> {h['greedy_exact']['final']:.3f}; sampled reward "
              f"{h['sampled_reward']['init']:.3f} -> {h['sampled_reward']['final']:.3f}; KL(final||init) "
              f"{h['kl_final_init']:.3f} (train log kl {rec['train_log_last']['kl']:.3f}); {train_s:.0f}s", flush=True)

    agg = {}
    for split in ("heldout", "heldout_seen_target", "heldout_unseen_target", "train_prompts"):
        if any(results["seeds"][s][split] is None for s in seeds):
            continue  # e.g. no unseen targets when the training prompts end in every content token
        agg[split] = {}
        for k in ("greedy_reward", "greedy_exact", "sampled_reward", "sampled_exact_prob"):
            agg[split][k] = {part: mean_std([results["seeds"][s][split][k][part] for s in seeds])
                             for part in ("init", "final", "gain")}
        agg[split]["kl_final_init"] = mean_std([results["seeds"][s][split]["kl_final_init"] for s in seeds])
    agg["train_log_kl"] = mean_std([results["seeds"][s]["train_log_last"]["kl"] for s in seeds])
    results.update(aggregate=agg, config=args.config, overrides=args.overrides, fixed_init=args.fixed_init,
                   train_prompts=args.train_prompts or "config",
                   samples_per_prompt=args.samples, heldout_prompts=args.heldout, wall_s=time.time() - t0,
                   versions={"jax": jax.__version__}, command=" ".join(sys.argv))
    print(table(results, seeds))
    path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"wrote {path}")
    return results


def table(results, seeds) -> str:
    f = lambda d: f"{d['init']:.3f} → {d['final']:.3f} ({d['gain']:+.3f})"
    lines = ["| seed | held-out greedy reward | greedy exact match | sampled reward | sampled P(exact) | "
             "KL(final‖init) held-out | train-log KL |", "|---|---|---|---|---|---:|---:|"]
    for s in seeds:
        h = results["seeds"][s]["heldout"]
        lines.append(f"| {s} | {f(h['greedy_reward'])} | {f(h['greedy_exact'])} | {f(h['sampled_reward'])} | "
                     f"{f(h['sampled_exact_prob'])} | {h['kl_final_init']:.3f} | "
                     f"{results['seeds'][s]['train_log_last']['kl']:.3f} |")
    a = results["aggregate"]["heldout"]
    ms = lambda d: f"{d['mean']:+.3f} ± {d['std']:.3f}"
    kl = results["aggregate"]["train_log_kl"]
    lines.append(f"| gain, mean ± std | {ms(a['greedy_reward']['gain'])} | {ms(a['greedy_exact']['gain'])} | "
                 f"{ms(a['sampled_reward']['gain'])} | {ms(a['sampled_exact_prob']['gain'])} | "
                 f"{a['kl_final_init']['mean']:.3f} ± {a['kl_final_init']['std']:.3f} | "
                 f"{kl['mean']:.3f} ± {kl['std']:.3f} |")
    lines.append("")
    lines.append("| split | greedy reward gain | greedy exact-match gain | sampled reward gain | final greedy exact |")
    lines.append("|---|---|---|---|---|")
    for split in ("heldout_seen_target", "heldout_unseen_target", "train_prompts"):
        if split not in results["aggregate"]:
            continue
        a = results["aggregate"][split]
        n = results["seeds"][seeds[0]][split]["n_prompts"]
        lines.append(f"| {split} ({n} prompts) | {ms(a['greedy_reward']['gain'])} | {ms(a['greedy_exact']['gain'])} | "
                     f"{ms(a['sampled_reward']['gain'])} | {a['greedy_exact']['final']['mean']:.3f} ± "
                     f"{a['greedy_exact']['final']['std']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

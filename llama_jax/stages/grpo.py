"""GRPO for language models: `llama-jax grpo CONFIG.yaml [--out DIR] [k=v ...]`.

One iteration (= one `train.step`) on the PPO stage's machinery (`rollout_trainer.RolloutTrainer`:
prompts, LoRA policy with the LoRA-off reference, sampling, rewards, the loop shell with exact
resume and metrics.jsonl):
  1. `train.batch_size` prompts of step s (seeded per-epoch permutation), each repeated
     `grpo.group_size` (G) times in adjacent rows;
  2. rollout: G samples per prompt at `grpo.temperature` with the KV-cache decoder; one
     teacher-forced pass each for old and reference log-probs (no critic, no value model);
  3. sequence rewards (a reward function on the host, or a reward model's normalised score;
     `grpo.kl_in: reward` subtracts kl_coef x the sequence's KL estimate), group-relative
     advantages (`rl.grpo_math.group_advantages`: mean baseline, std scaling by
     `grpo.scale_rewards`, false = Dr. GRPO); groups with all-equal rewards are counted
     (`equal_groups`) and, with `grpo.drop_equal_groups`, left out of the update;
  4. `grpo.epochs` x `grpo.minibatches` updates of `rl.grpo_math.grpo_loss` (asymmetric clip,
     k3 KL loss term when `grpo.kl_in: loss`, token- or sequence-level aggregation).  Each epoch
     shuffles the rows and moves the rows of dropped groups behind the kept ones, so the kept rows
     fill the first minibatches (fixed minibatch size) and a minibatch with no valid token is
     skipped (`lax.cond`: not computed; parameters and optimizer state kept as they were): the
     update's cost follows the informative rows (the demo drops ~3/4 of its groups).

The options are the typed `GRPOConfig` (the `grpo:` section); `train.batch_size` counts prompts,
so one step samples batch_size x G responses.  The checkpoint's `state` item has the training
loop's layout (`llama-jax export --model RUN_DIR` exports the policy).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ..rl import grpo_math, ppo_math
from ..rl.rollout import make_experience_fn, response_logprobs
from ..train.config import ConfigError, TrainSection, load_config, opt
from ..train.optim import init_opt_state, make_optimizer, on_mesh, opt_state_shardings
from ..train.run import TrainingError
from .rollout_trainer import RolloutConfig, RolloutOptions, RolloutTrainer, rl_train


@dataclass
class GRPOOptions(RolloutOptions):
    """The `grpo:` section.  Reward: exactly one of reward_model and reward_fn (as in `ppo:`)."""
    group_size: int = opt(8, "G samples per prompt")
    epochs: int = opt(1, "passes over one rollout batch")
    minibatches: int = opt(1, "updates per pass (must divide train.batch_size x group_size)")
    clip_low: float = opt(0.2, "ratio clipped to [1 - clip_low, 1 + clip_high]")
    clip_high: float = opt(0.2, "> clip_low: clip-higher (DAPO: 0.28)")
    scale_rewards: bool = opt(True, "divide by the group's reward std; false = Dr. GRPO")
    kl_coef: float = opt(0.04, "beta")
    kl_in: str = opt("loss", "loss: beta x KL estimate per token in the loss; reward: in the sequence reward",
                     ("loss", "reward"))
    kl_estimator: str = opt("k3", "per-token KL estimate", ("k1", "k2", "k3"))
    aggregation: str = opt("token", "token (DAPO) | sequence (original GRPO)", tuple(grpo_math.AGGREGATIONS))
    drop_equal_groups: bool = opt(False, "leave groups whose rewards are all equal out of the update")
    missing_eos_score: float | None = opt(-1.0, "reward of a response with no EOS within max_new_tokens; null = keep")
    ent_coef: float = opt(0.0, "entropy bonus")

    def check(self, where: str = "grpo.") -> None:
        where = where or "grpo."
        super().check(where)
        if self.group_size < 2:
            raise ConfigError(f"{where}group_size: {self.group_size}, must be >= 2 (advantages are relative to the "
                              "group)")
        if self.epochs < 1 or self.minibatches < 1:
            raise ConfigError(f"{where}epochs and {where}minibatches must be >= 1")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ConfigError(f"{where}clip_low / clip_high: {self.clip_low} / {self.clip_high} (need 0 <= clip_low "
                              "< 1, clip_high >= 0)")
        if self.kl_coef < 0:
            raise ConfigError(f"{where}kl_coef: {self.kl_coef} < 0")


@dataclass
class GRPOConfig(RolloutConfig):
    grpo: GRPOOptions = field(default_factory=GRPOOptions, metadata={"doc": "GRPO: reward, groups, loss, KL"})
    train: TrainSection = field(default_factory=rl_train,
                                metadata={"doc": "optimizer, schedule, logging (batch_size: prompts per step)"})


TIMING_FIELDS = ("iter_time_s", "rollout_time_s", "update_time_s", "tokens_per_sec")


class GRPOTrainer(RolloutTrainer):
    """Models, data and the jitted pieces of one GRPO iteration; `run(run_dir)` is the shared loop."""

    section = task = "grpo"

    def __init__(self, cfg: GRPOConfig):
        self.cfg = cfg
        self.gc = cfg.grpo
        tc = cfg.train
        self.G = self.gc.group_size
        prompts_per_step = tc.batch_size
        if tc.grad_accum != 1:
            raise ConfigError("grpo: train.grad_accum must be 1 (GRPO splits the rollout with grpo.minibatches)")
        if prompts_per_step % jax.process_count():
            raise ConfigError(f"train.batch_size={prompts_per_step} must be divisible by {jax.process_count()} processes")
        if (prompts_per_step * self.G) % self.gc.minibatches:
            raise ConfigError(f"grpo.minibatches={self.gc.minibatches} must divide train.batch_size x "
                              f"grpo.group_size = {prompts_per_step * self.G}")
        if cfg.lora.enabled and cfg.lora.dropout > 0:
            raise ConfigError("grpo: lora.dropout must be 0 (dropout makes the rollout and update log-probs differ)")
        prompts, policy, rm = self._load(cfg)
        pol_params = self._attach_policy(policy, rm)
        ids, mask = self._set_shapes(prompts, prompts_per_step * self.G)
        self._prompt_batches(ids, mask, prompts_per_step)
        self.updates_per_step = self.gc.epochs * self.gc.minibatches
        self.tx, self.lr_fn = make_optimizer(tc.replace(steps=tc.steps * self.updates_per_step), pol_params)
        self._init_params = pol_params
        self._build_fns()

    # ------------------------------------------------------------------------- jitted pieces
    def _build_fns(self):
        gc, G, B = self.gc, self.G, self.B
        self.experience_fn = make_experience_fn(self.policy_graphdef, None, self.rm_graphdef,
                                                temperature=gc.temperature, eos_ids=self.eos_ids)
        beta, miss = float(gc.kl_coef), gc.missing_eos_score
        kl_in_reward = gc.kl_in == "reward" and beta > 0

        def advantages(exp, scores):
            mask = exp["mask"]
            raw = scores.astype(jnp.float32)
            scores = raw if miss is None else jnp.where(exp["has_eos"], raw, jnp.float32(miss))
            kl_tok = ppo_math.kl_estimate(exp["logprobs"], exp["ref_logprobs"], gc.kl_estimator) * mask
            seq_kl = jnp.sum(kl_tok, axis=-1)
            reward = scores - beta * seq_kl if kl_in_reward else scores
            adv, equal, gstd = grpo_math.group_advantages(reward, G, gc.scale_rewards)
            weight = jnp.repeat(~equal if gc.drop_equal_groups else jnp.ones_like(equal), G).astype(jnp.float32)
            f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
            stats = {
                "score": jnp.mean(scores), "score_std": jnp.std(scores), "score_raw": jnp.mean(raw),
                "reward": jnp.mean(reward), "kl": jnp.mean(seq_kl),
                "group_reward_std": jnp.mean(gstd),
                "equal_groups": jnp.sum(equal.astype(jnp.float32)), "equal_group_frac": jnp.mean(equal.astype(jnp.float32)),
                "dropped_groups": jnp.sum(equal.astype(jnp.float32)) if gc.drop_equal_groups else f32(0.0),
                "eos_rate": jnp.mean(exp["has_eos"].astype(jnp.float32)),
                "response_length": jnp.mean(jnp.sum(mask, -1)),
                "rollout_entropy": ppo_math.masked_mean(exp["rollout_entropy"], mask),
                "advantage_abs_mean": jnp.mean(jnp.abs(adv)),
            }
            return {"advantages": adv, "row_weight": weight}, stats

        self.advantages_fn = jax.jit(advantages)

        pol_gd, tx = self.policy_graphdef, self.tx
        E, M, T = gc.epochs, gc.minibatches, float(gc.temperature)
        loss_beta = beta if gc.kl_in == "loss" else 0.0

        def pol_loss(p, frz, mb):
            model = nnx.merge(pol_gd, p, frz)
            logp, ent = response_logprobs(model, mb["ids"], mb["attn"], mb["tokens"], T)
            loss, st = grpo_math.grpo_loss(logp, mb["logprobs"], mb["ref_logprobs"], mb["advantages"], mb["mask"],
                                           clip_low=gc.clip_low, clip_high=gc.clip_high, kl_coef=loss_beta,
                                           kl_estimator=gc.kl_estimator, aggregation=gc.aggregation)
            entropy = ppo_math.masked_mean(ent, mb["mask"])
            return loss - gc.ent_coef * entropy, {**st, "policy_loss": loss, "entropy": entropy}

        def update(st, pol_frz, batch, rng):
            keys = ("ids", "attn", "tokens", "mask", "logprobs", "ref_logprobs", "advantages", "row_weight")
            batch = {k: batch[k] for k in keys}
            batch["mask"] = batch["mask"] * batch.pop("row_weight")[:, None]  # dropped groups: no tokens
            dropped = (jnp.sum(batch["mask"], axis=-1) == 0).astype(jnp.int32)  # rows with no valid token

            def epoch_order(e):  # shuffled, then rows with tokens first (stable: still shuffled)
                perm = jax.random.permutation(jax.random.fold_in(rng, e), B)
                return perm[jnp.argsort(dropped[perm], stable=True)]

            idx = jnp.stack([epoch_order(e) for e in range(E)]).reshape(E * M, B // M)

            def step(s, mb):
                (loss, pst), g = jax.value_and_grad(pol_loss, has_aux=True)(s["params"], pol_frz, mb)
                gn = optax.global_norm(g)
                up, new_opt = tx.update(g, s["opt_state"], s["params"])
                finite = jnp.isfinite(loss) & jnp.isfinite(gn)
                keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
                s = {**s, "params": keep(optax.apply_updates(s["params"], up), s["params"]),
                     "opt_state": keep(new_opt, s["opt_state"]),
                     "nonfinite": jnp.where(finite, 0, s["nonfinite"] + 1)}
                return s, {**pst, "grad_norm": gn, "finite": finite.astype(jnp.float32),
                           "empty": jnp.float32(0.0)}

            def skip(s, mb):  # an empty minibatch changes nothing (not even Adam's moments) and costs nothing
                shapes = jax.eval_shape(step, s, mb)[1]
                return s, {**jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes),
                           "finite": jnp.float32(1.0), "empty": jnp.float32(1.0)}

            def one(s, rows):
                mb = jax.tree.map(lambda x: x[rows], batch)
                return jax.lax.cond(jnp.sum(mb["mask"]) > 0, step, skip, s, mb)

            st, stats = jax.lax.scan(one, st, idx)
            st = {**st, "step": st["step"] + 1}
            ran = 1.0 - stats["empty"]
            n_ran = jnp.maximum(jnp.sum(ran), 1.0)
            out = {k: jnp.sum(v * ran) / n_ran for k, v in stats.items() if k not in ("ratio_maxdev", "finite", "empty")}
            out["ratio_maxdev_first"] = stats["ratio_maxdev"][0]  # 0 up to rounding: same log-prob fn
            out["nonfinite_updates"] = jnp.sum(1.0 - stats["finite"])
            out["empty_updates"] = jnp.sum(stats["empty"])
            return st, out

        self._update = update

    # ------------------------------------------------------------------------- state
    def init_state(self):
        """The initial GRPO state (the training loop's layout).  Once: the update donates it."""
        if self._init_params is None:
            raise TrainingError("GRPOTrainer.init_state: already called (build a new trainer for another run)")
        pol, self._init_params = self._init_params, None
        mesh = self.mesh
        rep = NamedSharding(mesh, P())
        psh = jax.tree.map(lambda x: on_mesh(x, mesh), pol)
        self.shardings = {"step": rep, "params": psh, "opt_state": opt_state_shardings(self.tx, pol, psh, mesh),
                          "nonfinite": rep}
        st = {"step": jnp.zeros((), jnp.int32), "params": pol,
              "opt_state": init_opt_state(self.tx, pol, self.shardings["params"], mesh),
              "nonfinite": jnp.zeros((), jnp.int32)}
        st = jax.device_put(st, self.shardings)
        self.policy_frozen = jax.device_put(self.policy_frozen,
                                            jax.tree.map(lambda x: on_mesh(x, mesh), self.policy_frozen))
        self.update_fn = jax.jit(self._update, donate_argnums=(0,), out_shardings=(self.shardings, None))
        return st

    def checkpoint_items(self, st):
        return {"state": {k: st[k] for k in ("step", "params", "opt_state", "nonfinite")}}

    @staticmethod
    def from_checkpoint_items(it):
        return dict(it["state"])

    # ------------------------------------------------------------------------- one iteration
    def collect(self, st, step: int):
        """Rollout + group advantages for step `step`: (batch dict of device arrays, stats)."""
        prompts = self.step_prompts(step, repeat=self.G)
        tokens = self.sample(st, prompts, jax.random.fold_in(self.step_rng(step), 0))
        exp = self.call("experience", self.experience_fn, st["params"], self.policy_frozen, self.ref_store, None, None,
                        self.rm_state, prompts["prompt_ids"], prompts["prompt_mask"], tokens)
        scores = self.sequence_rewards(exp, prompts["prompt_ids"], tokens)
        adv, stats = self.call("advantages", self.advantages_fn, exp, scores)
        return {**exp, **adv, "scores": scores, "prompt_ids": prompts["prompt_ids"]}, stats

    def iteration(self, st, step: int):
        """One GRPO iteration from state `st` (donated); returns (new state, metrics as floats)."""
        t0 = time.perf_counter()
        batch, stats = self.collect(st, step)
        jax.block_until_ready(batch["advantages"])
        t1 = time.perf_counter()
        st, ustats = self.call("update", self.update_fn, st, self.policy_frozen, batch,
                               jax.random.fold_in(self.step_rng(step), 1))
        rec = {k: float(v) for k, v in jax.device_get({**stats, **ustats}).items()}
        t2 = time.perf_counter()
        rec["lr"] = float(self.lr_fn(step * self.updates_per_step))
        rec["rollout_time_s"], rec["update_time_s"], rec["iter_time_s"] = t1 - t0, t2 - t1, t2 - t0
        rec["tokens_per_sec"] = self.B * (self.P + rec["response_length"]) / (t2 - t0)
        return st, rec


def run(config_path, out: str | None = None, overrides=()) -> dict:
    return run_config(load_config(GRPOConfig, config_path, list(overrides)), out)


def run_config(cfg: GRPOConfig, out: str | None = None) -> dict:
    run_dir = Path(out).absolute() if out else cfg.default_run_dir("grpo")
    trainer = GRPOTrainer(cfg)
    gc = trainer.gc
    print(f"grpo: {trainer.n_prompts} prompts (padded to {trainer.P} tokens), {trainer.prompts_per_step} prompts x "
          f"G={gc.group_size} samples x {trainer.N} new tokens per step; policy "
          f"{'LoRA' if trainer.lora else 'full'} ({trainer.n_policy_params:,} trainable); reward "
          f"{gc.reward_model or gc.reward_fn}" + (f" (offset {trainer.reward_offset:g})" if trainer.reward_offset else "")
          + f"; KL {gc.kl_estimator} x {gc.kl_coef:g} in the {gc.kl_in}, advantages "
          f"{'/ group std' if gc.scale_rewards else 'unscaled (Dr. GRPO)'}, {gc.aggregation}-level loss")
    result = trainer.run(run_dir)
    result["run_dir"] = str(run_dir)
    result["trainer"] = trainer
    result["model"] = trainer.policy_model(trainer.state)
    return result

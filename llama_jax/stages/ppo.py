"""PPO (RLHF) for language models: `llama-jax ppo CONFIG.yaml [--out DIR] [k=v ...]`.

One iteration (= one `train.step`):
  1. prompts of step s (a seeded per-epoch permutation, so step s always gets the same prompts);
  2. rollout: sample `ppo.max_new_tokens` tokens at `ppo.temperature` with the KV-cache decoder,
     truncate after the first EOS; teacher-forced passes give old / reference log-probs, values
     and the reward-model score (or a reward function by name);
  3. per-token rewards -beta * KL (+ score on the EOS), GAE, whitened advantages;
  4. `ppo.epochs` x `ppo.minibatches` clipped updates of the policy and the critic (two optimizers);
  5. beta controller, metrics.jsonl, orbax checkpoint.

Models: the policy starts from `model.init` (the SFT model), LoRA (`lora.enabled`) or full.
The reference policy is the same weights with LoRA off (B = 0, no second copy of the base), or a
frozen copy for full fine-tuning.  The critic is a separate value model (head='score') initialised
from `ppo.value_model`, else the reward model, else (or with value_model: policy) the policy's
backbone with a zero value head.

Exactness: the RNG of step s is fold_in(seed, s), prompts are a function of s, and the checkpoint
holds everything that changes (policy and critic trainables, both optimizer states, beta, step),
so a resumed run logs exactly what an uninterrupted one does.  The checkpoint's `state` item has
the training loop's layout for the policy, so `llama-jax export --model RUN_DIR` exports it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from .. import lora
from ..rl import ppo_math
from ..rl.reward_model import score_model_from_lm
from ..rl.rollout import get_reward_fn, make_experience_fn, response_logprobs, response_values
from ..train.config import ConfigError, TrainSection, load_config, opt
from ..train.optim import count_params, init_opt_state, make_optimizer, on_mesh, opt_state_shardings
from ..train.run import TrainingError, build_model
from .rollout_trainer import RolloutConfig, RolloutOptions, RolloutTrainer, rl_train

log = logging.getLogger(__name__)


@dataclass
class PPOOptions(RolloutOptions):
    value_model: str | None = opt(None, "critic init: a score-head model, or 'policy' (the policy's backbone + a zero "
                                  "value head); default: the reward model, else 'policy'")
    critic_lora: bool | None = opt(None, "LoRA critic (value head trained in full); default: lora.enabled")
    critic_lr: float | None = opt(None, "critic learning rate; default: train.lr")
    critic_warmup: int = opt(0, "first iterations that train only the critic (the policy and its optimizer "
                             "kept): a critic initialised from the RM predicts scores, not returns, and its "
                             "early advantages are noise")
    temperature: float = opt(0.7, "sampling temperature (log-probs use the same)")
    epochs: int = opt(4, "passes over one rollout batch")
    minibatches: int = opt(1, "updates per pass (must divide train.batch_size)")
    gamma: float = opt(1.0, "discount")
    lam: float = opt(0.95, "GAE lambda")
    clip: float = opt(0.2, "policy ratio clip")
    value_clip: float = opt(0.2, "value clip")
    vf_coef: float = opt(0.1, "value loss coefficient")
    ent_coef: float = opt(0.0, "entropy bonus")
    kl_estimator: str = opt("k1", "per-token KL estimate in the reward", ("k1", "k2", "k3"))
    kl_coef: float = opt(0.05, "beta (the initial beta when adaptive)")
    adaptive_kl: bool = opt(False, "adapt beta toward kl_target (Ziegler et al.)")
    kl_target: float = opt(6.0, "adaptive KL target")
    kl_horizon: float = opt(10000.0, "adaptive KL horizon")
    whiten_rewards: bool = opt(False, "whiten the per-token rewards")
    missing_eos_score: float | None = opt(-1.0, "score of a response with no EOS within max_new_tokens; null = keep")
    score_clip: float | None = opt(None, "clip the (normalised) sequence score to [-c, c] (reward-model outliers)")
    check_fn: str | None = opt(None, "a reward function evaluated on the rollouts but never trained on (check_score: "
                               "the RM score rising while check_score falls is reward hacking)")
    check_fn_args: dict = opt({}, "check_fn's factory arguments")

    def check(self, where: str = "") -> None:
        super().check(where)
        if self.epochs < 1:
            raise ConfigError(f"{where}epochs must be >= 1")
        if self.minibatches < 1:
            raise ConfigError(f"{where}minibatches must be >= 1")
        if self.critic_warmup < 0:
            raise ConfigError(f"{where}critic_warmup: {self.critic_warmup} < 0")


@dataclass
class PPOConfig(RolloutConfig):
    ppo: PPOOptions = field(default_factory=PPOOptions, metadata={"doc": "PPO: reward, rollouts, losses, KL"})
    train: TrainSection = field(default_factory=lambda: rl_train(batch_size=16),
                                metadata={"doc": "optimizer, schedule, logging (batch_size: rollouts per step)"})


TIMING_FIELDS = ("iter_time_s", "rollout_time_s", "tokens_per_sec")


# ----------------------------------------------------------------------------- models
def _share_frozen(score_model):
    """A second model over the same weight buffers, except the value head, which is copied: it is
    the one leaf of a LoRA critic that trains (its buffer is donated to the update, the others
    are only ever read)."""
    graphdef, state = nnx.split(score_model)
    flat = [(p, v.replace(jnp.copy(v.get_value()) if str(p[0]) == "score" else v.get_value()))
            for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def critic_lora(cfg: PPOConfig) -> bool:
    """Whether the critic trains LoRA factors (+ its value head) or in full."""
    v = cfg.ppo.critic_lora
    return cfg.lora.enabled if v is None else v


class PPOTrainer(RolloutTrainer):
    """Models, data and the jitted pieces of one PPO iteration.  `run(run_dir)` (the shared loop
    shell of `rollout_trainer.RolloutTrainer`) is the loop."""

    section = task = "ppo"

    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        pc, tc = cfg.ppo, cfg.train
        self._check(cfg)
        prompts, policy, rm = self._load(cfg)
        mesh, V = self.mesh, self.config.vocab_size
        # -- critic from the value model, the RM or the policy's backbone (built before LoRA is attached)
        critic_src = critic_source(pc)
        crit_lora = critic_lora(cfg)
        if critic_src and crit_lora and critic_src == pc.reward_model:
            critic = _share_frozen(rm)  # a LoRA critic on the RM: no second copy of the RM's base
        elif critic_src:
            critic = build_model(cfg.with_model(critic_src), mesh, None, head="score")
        else:  # the policy's backbone (copied: the critic's trainables are donated) with a zero value head
            critic = score_model_from_lm(policy, copy=True, mesh=mesh)
        if critic.config.vocab_size != V:
            raise ConfigError(f"ppo: the value model has vocab_size {critic.config.vocab_size}, the policy {V}: "
                              "they must share the tokenizer")

        pol_params, crit_params = self._attach_models(policy, critic, crit_lora, rm)

        # -- data: left-padded to one length, step-indexed like every other stage
        ids, mask = self._set_shapes(prompts, tc.batch_size)
        self._prompt_batches(ids, mask, self.B)
        self._optimizers(pol_params, crit_params)
        self._init_params = (pol_params, crit_params)
        self.check_fn = get_reward_fn(pc.check_fn, pc.check_fn_args) if pc.check_fn else None
        self._build_fns()

    @classmethod
    def abstract(cls, cfg: PPOConfig, mesh, policy, critic, rm, prompt_length: int) -> "PPOTrainer":
        """A trainer over abstract models (nnx.eval_shape; leaves ShapeDtypeStructs carrying their
        shardings) and no data, for the planner (`llama_jax.plan`): the same LoRA, splits,
        optimizers and jitted pieces as a real run, with prompts of `prompt_length` tokens.
        `critic` is the critic model before LoRA, `rm` the reward model (or None)."""
        self = cls.__new__(cls)
        self.cfg = cfg
        cls._check(cfg)
        self.mesh, self.tok, self.config = mesh, None, policy.config
        self.reward_offset, self.check_fn = 0.0, None
        self._set_reward_fn()
        rm = self.store_reward_model(rm) if rm is not None else None
        pol_params, crit_params = self._attach_models(policy, critic, critic_lora(cfg), rm)
        self._set_shapes([[0] * int(prompt_length)], cfg.train.batch_size)
        self.n_prompts, self.batches = 0, None
        self._optimizers(pol_params, crit_params)
        self._init_params = None
        self._abstract_params = (pol_params, crit_params)
        self._build_fns()
        return self

    def _attach_models(self, policy, critic, critic_lora: bool, rm):
        """LoRA on the policy (and the critic), the trainable / frozen splits, the reference store."""
        cfg = self.cfg
        lc = cfg.lora
        pol_params = self._attach_policy(policy, rm)
        crit_filter = nnx.Param
        if critic_lora:
            lora.apply(critic, rank=lc.rank, alpha=lc.alpha, targets=tuple(lc.targets), dropout=0.0,
                       trainable_modules=("score",), seed=cfg.train.seed)
            # the frozen base as the policy's (and the RM's, whose buffers a critic on the RM shares:
            # already stored so, so nothing is copied): frozen dtype, QLoRA quantization
            mc = cfg.model
            lora.prepare_frozen(critic, frozen_dtype=mc.frozen_dtype, quantization=mc.quantization,
                                tile=mc.quant_tile or 64)
            crit_filter = lora.trainable_filter(critic)
        self.critic_graphdef, crit_params, self.critic_frozen = nnx.split(critic, crit_filter, ...)
        self.n_critic_params = count_params(crit_params)
        return pol_params, crit_params

    def _optimizers(self, pol_params, crit_params):
        """Policy and critic AdamW; the schedule runs over every minibatch update."""
        pc, tc = self.cfg.ppo, self.cfg.train
        n_updates = tc.steps * pc.epochs * pc.minibatches
        self.tx, self.lr_fn = make_optimizer(tc.replace(steps=n_updates), pol_params)
        clr = tc.lr if pc.critic_lr is None else pc.critic_lr
        self.ctx, self.critic_lr_fn = make_optimizer(
            tc.replace(steps=n_updates, lr=clr, lora_lr=clr if pc.critic_lr is not None else tc.lora_lr), crit_params)
        self.updates_per_step = pc.epochs * pc.minibatches

    @staticmethod
    def _check(cfg: PPOConfig):
        pc, tc, lc = cfg.ppo, cfg.train, cfg.lora
        if tc.grad_accum != 1:
            raise ConfigError("ppo: train.grad_accum must be 1 (PPO splits the rollout with ppo.minibatches)")
        B, mb = tc.batch_size, pc.minibatches
        if B % mb:
            raise ConfigError(f"ppo.minibatches={mb} must divide train.batch_size={B}")
        if B % jax.process_count():
            raise ConfigError(f"train.batch_size={B} must be divisible by {jax.process_count()} processes")
        if lc.enabled and lc.dropout > 0:
            raise ConfigError("ppo: lora.dropout must be 0 (dropout makes the rollout and update log-probs "
                              "differ: the ratio is no longer 1 before an update)")

    # ------------------------------------------------------------------------- jitted pieces
    def _build_fns(self):
        pc = self.cfg.ppo
        T, N = pc.temperature, self.N
        self.experience_fn = make_experience_fn(self.policy_graphdef, self.critic_graphdef, self.rm_graphdef,
                                                temperature=T, eos_ids=self.eos_ids)
        ctl = ppo_math.KLController(pc.adaptive_kl, pc.kl_target, pc.kl_horizon)
        kind, miss, sclip = pc.kl_estimator, pc.missing_eos_score, pc.score_clip
        gamma, lam, B = pc.gamma, pc.lam, self.B

        def advantages(exp, scores, beta):
            mask = exp["mask"]
            raw = scores.astype(jnp.float32)
            if sclip is not None:
                scores = jnp.clip(scores, -float(sclip), float(sclip))
            if miss is not None:
                scores = jnp.where(exp["has_eos"], scores, jnp.float32(miss))
            kl = ppo_math.kl_estimate(exp["logprobs"], exp["ref_logprobs"], kind) * mask
            rewards, non_score = ppo_math.token_rewards(scores, kl, mask, beta)
            if pc.whiten_rewards:
                rewards = ppo_math.whiten(rewards, mask, shift_mean=False)
            adv, ret = ppo_math.gae(rewards, exp["values"], mask, gamma, lam)
            seq_kl = jnp.sum(kl, axis=-1)
            mean_kl = jnp.mean(seq_kl)
            stats = {
                "score": jnp.mean(scores), "score_std": jnp.std(scores), "score_raw": jnp.mean(raw),
                "kl": mean_kl, "non_score_reward": jnp.mean(jnp.sum(non_score, -1)),
                "rlhf_reward": jnp.mean(scores + jnp.sum(non_score, -1)),
                "eos_rate": jnp.mean(exp["has_eos"].astype(jnp.float32)),
                "response_length": jnp.mean(jnp.sum(mask, -1)),
                "rollout_entropy": ppo_math.masked_mean(exp["rollout_entropy"], mask),
                "value_mean": ppo_math.masked_mean(exp["values"], mask),
                "return_mean": ppo_math.masked_mean(ret, mask),
                "advantage_mean": ppo_math.masked_mean(adv, mask),
                "beta": jnp.asarray(beta, jnp.float32),
            }
            return {"advantages": ppo_math.whiten(adv, mask), "returns": ret}, stats, \
                ppo_math.next_beta(beta, mean_kl, B, ctl)

        self.advantages_fn = jax.jit(advantages)

        pol_gd, crit_gd = self.policy_graphdef, self.critic_graphdef
        clip, vclip = pc.clip, pc.value_clip
        vf_coef, ent_coef = pc.vf_coef, pc.ent_coef
        E, M, warmup = pc.epochs, pc.minibatches, pc.critic_warmup
        tx, ctx = self.tx, self.ctx

        def pol_loss(p, frz, mb):
            model = nnx.merge(pol_gd, p, frz)
            logp, ent = response_logprobs(model, mb["ids"], mb["attn"], mb["tokens"], T)
            loss, st = ppo_math.policy_loss(logp, mb["logprobs"], mb["advantages"], mb["mask"], clip)
            entropy = ppo_math.masked_mean(ent, mb["mask"])
            return loss - ent_coef * entropy, {**st, "policy_loss": loss, "entropy": entropy}

        def crit_loss(c, frz, mb):
            critic = nnx.merge(crit_gd, c, frz)
            v = response_values(critic, mb["ids"], mb["attn"], N)
            loss, st = ppo_math.value_loss(v, mb["values"], mb["returns"], mb["mask"], vclip)
            return vf_coef * loss, {**st, "value_loss": loss}

        def update(st, pol_frz, crit_frz, batch, rng):
            keys = ("ids", "attn", "tokens", "mask", "logprobs", "values", "advantages", "returns")
            batch = {k: batch[k] for k in keys}
            perms = jnp.stack([jax.random.permutation(jax.random.fold_in(rng, e), B) for e in range(E)])
            idx = perms.reshape(E * M, B // M)
            train_policy = st["step"] >= warmup  # critic warmup: the policy (and Adam's moments) kept

            def one(s, rows):
                mb = jax.tree.map(lambda x: x[rows], batch)
                (lp, pst), gp = jax.value_and_grad(pol_loss, has_aux=True)(s["params"], pol_frz, mb)
                (lc, cst), gc = jax.value_and_grad(crit_loss, has_aux=True)(s["critic_params"], crit_frz, mb)
                gnp, gnc = optax.global_norm(gp), optax.global_norm(gc)
                up, new_opt = tx.update(gp, s["opt_state"], s["params"])
                uc, new_copt = ctx.update(gc, s["critic_opt_state"], s["critic_params"])
                finite = jnp.isfinite(lp) & jnp.isfinite(lc) & jnp.isfinite(gnp) & jnp.isfinite(gnc)
                keep = lambda new, old, on=finite: jax.tree.map(lambda a, b: jnp.where(on, a, b), new, old)  # noqa: E731
                s = {**s,
                     "params": keep(optax.apply_updates(s["params"], up), s["params"], finite & train_policy),
                     "opt_state": keep(new_opt, s["opt_state"], finite & train_policy),
                     "critic_params": keep(optax.apply_updates(s["critic_params"], uc), s["critic_params"]),
                     "critic_opt_state": keep(new_copt, s["critic_opt_state"]),
                     "nonfinite": jnp.where(finite, 0, s["nonfinite"] + 1)}
                return s, {**pst, **cst, "grad_norm": gnp, "critic_grad_norm": gnc,
                           "finite": finite.astype(jnp.float32)}

            st, stats = jax.lax.scan(one, st, idx)
            st = {**st, "step": st["step"] + 1}
            out = {k: jnp.mean(v) for k, v in stats.items() if k not in ("ratio_maxdev", "finite")}
            out["ratio_maxdev_first"] = stats["ratio_maxdev"][0]  # 0 up to rounding: same log-prob fn
            out["nonfinite_updates"] = jnp.sum(1.0 - stats["finite"])
            out["policy_updated"] = train_policy.astype(jnp.float32)
            return st, out

        self._update = update
        self.update_fn = None  # jitted with the state's shardings in init_state

    # ------------------------------------------------------------------------- state
    def init_state(self):
        """The initial PPO state.  Once: the update donates these parameter buffers."""
        if self._init_params is None:
            raise TrainingError("PPOTrainer.init_state: already called (build a new trainer for another run)")
        pol, crit = self._init_params
        self._init_params = None
        mesh = self.mesh
        self.shardings = self._state_shardings(pol, crit)
        sh = self.shardings
        st = {"step": jnp.zeros((), jnp.int32), "params": pol,
              "opt_state": init_opt_state(self.tx, pol, sh["params"], mesh),
              "nonfinite": jnp.zeros((), jnp.int32), "critic_params": crit,
              "critic_opt_state": init_opt_state(self.ctx, crit, sh["critic_params"], mesh),
              "beta": jnp.asarray(self.cfg.ppo.kl_coef, jnp.float32)}
        st = jax.device_put(st, self.shardings)
        fix = lambda t: jax.device_put(t, jax.tree.map(lambda x: on_mesh(x, mesh), t))
        self.policy_frozen, self.critic_frozen = fix(self.policy_frozen), fix(self.critic_frozen)
        self._jit_update()
        return st

    def abstract_state(self):
        """For the planner: ShapeDtypeStructs (with shardings) of init_state()'s state, and the
        jitted update built over them exactly as init_state builds it."""
        pol, crit = self._abstract_params
        self.shardings = self._state_shardings(pol, crit)
        shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": pol,
                  "opt_state": jax.eval_shape(self.tx.init, pol), "nonfinite": jax.ShapeDtypeStruct((), jnp.int32),
                  "critic_params": crit, "critic_opt_state": jax.eval_shape(self.ctx.init, crit),
                  "beta": jax.ShapeDtypeStruct((), jnp.float32)}
        self._jit_update()
        # the frozen pieces as the real run places them (init_state), abstract
        mesh = self.mesh
        sds = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_mesh(x, mesh)), t)  # noqa: E731
        self.policy_frozen, self.critic_frozen, self.ref_store = (sds(self.policy_frozen), sds(self.critic_frozen),
                                                                   sds(self.ref_store))
        self.rm_state = sds(self.rm_state) if self.rm_state is not None else None
        return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, self.shardings)

    def _state_shardings(self, pol, crit):
        """Trainables keep their shardings, optimizer moments follow them, scalars are replicated."""
        mesh = self.mesh
        rep = NamedSharding(mesh, P())
        psh = jax.tree.map(lambda x: on_mesh(x, mesh), pol)
        csh = jax.tree.map(lambda x: on_mesh(x, mesh), crit)
        return {"step": rep, "params": psh, "opt_state": opt_state_shardings(self.tx, pol, psh, mesh),
                "nonfinite": rep, "critic_params": csh,
                "critic_opt_state": opt_state_shardings(self.ctx, crit, csh, mesh), "beta": rep}

    def _jit_update(self):
        self.update_fn = jax.jit(self._update, donate_argnums=(0,), out_shardings=(self.shardings, None))

    # ------------------------------------------------------------------------- one iteration
    def collect(self, st, step: int, prompts: dict | None = None):
        """Rollout + advantages for step `step` (of `prompts`, default: the step's): (batch dict of
        device arrays, stats, new beta)."""
        rng = self.step_rng(step)
        prompts = self.step_prompts(step) if prompts is None else prompts
        tokens = self.sample(st, prompts, jax.random.fold_in(rng, 0))
        exp = self.call("experience", self.experience_fn, st["params"], self.policy_frozen, self.ref_store,
                        st["critic_params"], self.critic_frozen, self.rm_state, prompts["prompt_ids"],
                        prompts["prompt_mask"], tokens)
        scores = self.sequence_rewards(exp, prompts["prompt_ids"], tokens)
        adv, stats, new_beta = self.call("advantages", self.advantages_fn, exp, scores, st["beta"])
        if self.check_fn is not None:  # monitored, never trained on
            stats = {**stats, "check_score": jnp.mean(self._call_reward(prompts["prompt_ids"], tokens, exp["mask"],
                                                                        self.check_fn, "check_fn"))}
        batch = {**exp, **adv, "scores": scores, "prompt_ids": prompts["prompt_ids"]}
        return batch, stats, new_beta

    def update(self, st, batch: dict, step: int):
        """ppo.epochs x ppo.minibatches updates of the policy and the critic on `batch` (st donated)."""
        rng = jax.random.fold_in(self.step_rng(step), 1)
        return self.call("update", self.update_fn, st, self.policy_frozen, self.critic_frozen, batch, rng)

    def iteration(self, st, step: int):
        """One PPO iteration from state `st` (donated); returns (new state, metrics as floats)."""
        t0 = time.perf_counter()
        batch, stats, new_beta = self.collect(st, step)
        jax.block_until_ready(batch["advantages"])
        t1 = time.perf_counter()
        st, ustats = self.update(st, batch, step)
        if step >= self.cfg.ppo.critic_warmup:  # beta follows the KL of a policy that is trained
            st = {**st, "beta": new_beta}
        rec = {k: float(v) for k, v in jax.device_get({**stats, **ustats}).items()}
        t2 = time.perf_counter()
        rec["lr"] = float(self.lr_fn(step * self.updates_per_step))
        rec["rollout_time_s"], rec["iter_time_s"] = t1 - t0, t2 - t0
        rec["tokens_per_sec"] = self.B * (self.P + rec["response_length"]) / (t2 - t0)
        return st, rec

    # ------------------------------------------------------------------------- checkpoints (for the loop shell)
    def checkpoint_items(self, st):
        """`state` in the training loop's layout (so export finds the policy), the critic and the
        KL controller beside it."""
        return {"state": {"step": st["step"], "params": st["params"], "opt_state": st["opt_state"],
                          "nonfinite": st["nonfinite"]},
                "critic": {"params": st["critic_params"], "opt_state": st["critic_opt_state"]},
                "controller": {"beta": st["beta"]}}

    @staticmethod
    def from_checkpoint_items(it):
        return {**it["state"], "critic_params": it["critic"]["params"],
                "critic_opt_state": it["critic"]["opt_state"], "beta": it["controller"]["beta"]}

    def checkpoint_meta(self, st) -> dict:
        return {"beta": float(st["beta"])}

    def run(self, run_dir) -> dict:
        last = super().run(run_dir)
        last["critic_trainable_params"] = self.n_critic_params
        return last


def critic_source(pc: PPOOptions) -> str | None:
    """The model the critic starts from: ppo.value_model, else the reward model; None = the policy's
    backbone with a zero value head (value_model: policy, or no reward model)."""
    return None if pc.value_model == "policy" else (pc.value_model or pc.reward_model)


def run(config_path, out: str | None = None, overrides=()) -> dict:
    return run_config(load_config(PPOConfig, config_path, list(overrides)), out)


def run_config(cfg: PPOConfig, out: str | None = None) -> dict:
    run_dir = Path(out).absolute() if out else cfg.default_run_dir("ppo")
    trainer = PPOTrainer(cfg)
    print(f"ppo: {trainer.n_prompts} prompts (padded to {trainer.P} tokens), {trainer.B} rollouts x "
          f"{trainer.N} new tokens per step; policy {'LoRA' if trainer.lora else 'full'} "
          f"({trainer.n_policy_params:,} trainable), critic {trainer.n_critic_params:,} trainable; "
          f"reward {cfg.ppo.reward_model or cfg.ppo.reward_fn}"
          + (f" (offset {trainer.reward_offset:g})" if trainer.reward_offset else ""))
    result = trainer.run(run_dir)
    result["run_dir"] = str(run_dir)
    result["trainer"] = trainer
    result["model"] = trainer.policy_model(trainer.state)
    return result

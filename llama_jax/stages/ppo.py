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
from `ppo.value_model`, else the reward model, else the policy's backbone with a zero value head.

Exactness: the RNG of step s is fold_in(seed, s), prompts are a function of s, and the checkpoint
holds everything that changes (policy and critic trainables, both optimizer states, beta, step),
so a resumed run logs exactly what an uninterrupted one does.  The checkpoint's `state` item has
the training loop's layout for the policy, so `llama-jax export --model RUN_DIR` exports it.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ..rl import ppo_math
from ..rl.rollout import get_reward_fn, make_experience_fn, response_logprobs, response_values
from ..train.config import ConfigError, load_config, stage_defaults
from ..train.loop import TrainingError, init_opt_state, on_mesh, opt_state_shardings
from ..train.optim import count_params, make_optimizer
from .common import build_model
from .rl_common import RolloutTrainer, load_prompts, with_init  # noqa: F401  (load_prompts: public here too)

log = logging.getLogger(__name__)

DEFAULTS = stage_defaults(
    data={
        "prompt_files": [],        # json/jsonl: alpaca, sharegpt or preference records; the prompt is used
        "prompts": [],             # inline user messages (rendered with the template)
        "prompt_ids": [],          # inline token-id prompts (toy tasks; no tokenizer needed)
        "template": "chinese-alpaca-2",
        "max_prompt_length": 256,  # longer prompts are skipped (counted), never cut
        "max_prompts": None,
        "on_error": "skip",
    },
    ppo={
        "reward_model": None,      # HF / llama_jax dir of a head='score' model (frozen) ...
        "reward_fn": None,         # ... or a registered reward function (rl.rollout.REWARDS) / "module:fn"
        "reward_fn_args": {},      # given: reward_fn names a factory, called with these keyword arguments once
        "reward_offset": "auto",   # subtracted from RM scores; auto = the RM dir's reward_offset (llama-jax rm), else 0
        "value_model": None,       # critic init; default: the reward model, else the policy + zero head
        "critic_lora": None,       # LoRA critic (value head trained in full); default: lora.enabled
        "critic_lr": None,         # default: train.lr
        "max_new_tokens": 64,
        "temperature": 0.7,
        "epochs": 4,
        "minibatches": 1,
        "gamma": 1.0,
        "lam": 0.95,
        "clip": 0.2,
        "value_clip": 0.2,
        "vf_coef": 0.1,
        "ent_coef": 0.0,
        "kl_estimator": "k1",      # k1 | k2 | k3
        "kl_coef": 0.05,           # beta (initial beta when adaptive)
        "adaptive_kl": False,
        "kl_target": 6.0,
        "kl_horizon": 10000,
        "whiten_rewards": False,
        "missing_eos_score": -1.0,  # score of a response with no EOS within max_new_tokens; null = keep
        "score_clip": None,         # clip the (normalised) sequence score to [-c, c] (reward-model outliers)
        "check_fn": None,           # a reward function evaluated on the rollouts but never trained on, logged as
        "check_fn_args": {},        # check_score: the RM score rising while check_score falls is reward hacking
    },
    train={"steps": 100, "batch_size": 16, "lr": 1e-5, "schedule": "linear", "warmup_ratio": 0.0,
           "min_lr_ratio": 0.0, "weight_decay": 0.0, "b1": 0.9, "b2": 0.999, "log_every": 1, "eval_every": 0,
           "checkpoint_every": 20},
)

TIMING_FIELDS = ("iter_time_s", "rollout_time_s", "tokens_per_sec")


# ----------------------------------------------------------------------------- models
def _value_model_from_lm(lm, mesh=None):
    """A head='score' copy of an LM's backbone with a zero value head (values start at 0, so
    the first value losses are the returns' scale, not a random head's)."""
    from ..model import abstract_model
    from ..sharding import named_sharding

    graphdef, abstract = nnx.split(abstract_model(lm.config, head="score", mesh=mesh))
    src = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(lm, nnx.Param))}
    flat = []
    for path, v in nnx.to_flat_state(abstract):
        key = tuple(map(str, path))
        if key in src:
            val = jnp.copy(src[key].get_value())  # a copy: the critic's trainables are donated
        else:
            shape, dtype = v.get_value().shape, v.get_value().dtype
            val = jnp.zeros(shape, dtype)
            if mesh is not None:
                val = jax.device_put(val, named_sharding(mesh, v.axes, shape))
        flat.append((path, v.replace(val)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _share_frozen(score_model):
    """A second model over the same weight buffers, except the value head, which is copied: it is
    the one leaf of a LoRA critic that trains (its buffer is donated to the update, the others
    are only ever read)."""
    graphdef, state = nnx.split(score_model)
    flat = [(p, v.replace(jnp.copy(v.get_value()) if str(p[0]) == "score" else v.get_value()))
            for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def critic_lora(cfg) -> bool:
    """Whether the critic trains LoRA factors (+ its value head) or in full."""
    v = cfg["ppo"]["critic_lora"]
    return bool(cfg["lora"]["enabled"]) if v is None else bool(v)


class PPOTrainer(RolloutTrainer):
    """Models, data and the jitted pieces of one PPO iteration.  `run(run_dir)` (the shared loop
    shell of `rl_common.RolloutTrainer`) is the loop."""

    section = task = "ppo"

    def __init__(self, cfg: dict):
        self.cfg = cfg
        pc, tc = cfg["ppo"], cfg["train"]
        self._check(cfg)
        prompts, policy, rm = self._load(cfg)
        mesh, V = self.mesh, self.config.vocab_size
        # -- critic from the value model, the RM or the policy's backbone (built before LoRA is attached)
        critic_src = pc["value_model"] or pc["reward_model"]
        crit_lora = critic_lora(cfg)
        if critic_src and crit_lora and critic_src == pc["reward_model"]:
            critic = _share_frozen(rm)  # a LoRA critic on the RM: no second copy of the RM's base
        elif critic_src:
            critic = build_model(with_init(cfg, critic_src), mesh, None, head="score")
        else:
            critic = _value_model_from_lm(policy, mesh)
        if critic.config.vocab_size != V:
            raise ConfigError(f"ppo: the value model has vocab_size {critic.config.vocab_size}, the policy {V}: "
                              "they must share the tokenizer")

        pol_params, crit_params = self._attach_models(policy, critic, crit_lora, rm)

        # -- data: left-padded to one length, step-indexed like every other stage
        ids, mask = self._set_shapes(prompts, int(tc["batch_size"]))
        self._prompt_batches(ids, mask, self.B)
        self._optimizers(pol_params, crit_params)
        self._init_params = (pol_params, crit_params)
        self.check_fn = get_reward_fn(pc["check_fn"], pc["check_fn_args"]) if pc["check_fn"] else None
        self._build_fns()

    @classmethod
    def abstract(cls, cfg: dict, mesh, policy, critic, rm, prompt_length: int) -> "PPOTrainer":
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
        pol_params, crit_params = self._attach_models(policy, critic, critic_lora(cfg), rm)
        self._set_shapes([[0] * int(prompt_length)], int(cfg["train"]["batch_size"]))
        self.n_prompts, self.batches = 0, None
        self._optimizers(pol_params, crit_params)
        self._init_params = None
        self._abstract_params = (pol_params, crit_params)
        self._build_fns()
        return self

    def _attach_models(self, policy, critic, critic_lora: bool, rm):
        """LoRA on the policy (and the critic), the trainable / frozen splits, the reference store."""
        cfg = self.cfg
        tc, lc = cfg["train"], cfg["lora"]
        pol_params = self._attach_policy(policy, rm)
        crit_filter = nnx.Param
        if critic_lora:
            from .. import lora

            lora.apply(critic, rank=int(lc["rank"]), alpha=float(lc["alpha"]), targets=tuple(lc["targets"]),
                       dropout=0.0, trainable_modules=("score",), seed=int(tc["seed"]))
            crit_filter = lora.trainable_filter(critic)
        self.critic_graphdef, crit_params, self.critic_frozen = nnx.split(critic, crit_filter, ...)
        self.n_critic_params = count_params(crit_params)
        return pol_params, crit_params

    def _optimizers(self, pol_params, crit_params):
        """Policy and critic AdamW; the schedule runs over every minibatch update."""
        pc, tc = self.cfg["ppo"], self.cfg["train"]
        n_updates = int(tc["steps"]) * int(pc["epochs"]) * int(pc["minibatches"])
        self.tx, self.lr_fn = make_optimizer({**tc, "steps": n_updates}, pol_params)
        clr = tc["lr"] if pc["critic_lr"] is None else pc["critic_lr"]
        self.ctx, self.critic_lr_fn = make_optimizer(
            {**tc, "steps": n_updates, "lr": clr, "lora_lr": clr if pc["critic_lr"] is not None else tc["lora_lr"]},
            crit_params)
        self.updates_per_step = int(pc["epochs"]) * int(pc["minibatches"])

    @staticmethod
    def _check(cfg):
        pc, tc, lc = cfg["ppo"], cfg["train"], cfg["lora"]
        if bool(pc["reward_model"]) == bool(pc["reward_fn"]):
            raise ConfigError("ppo: give exactly one of ppo.reward_model (a score model) and ppo.reward_fn")
        if int(tc["grad_accum"]) != 1:
            raise ConfigError("ppo: train.grad_accum must be 1 (PPO splits the rollout with ppo.minibatches)")
        B, mb = int(tc["batch_size"]), int(pc["minibatches"])
        if mb < 1 or B % mb:
            raise ConfigError(f"ppo.minibatches={mb} must divide train.batch_size={B}")
        if B % jax.process_count():
            raise ConfigError(f"train.batch_size={B} must be divisible by {jax.process_count()} processes")
        if not float(pc["temperature"]) > 0:
            raise ConfigError("ppo.temperature must be > 0 (sampling; log-probs use the same temperature)")
        if int(pc["epochs"]) < 1 or int(pc["max_new_tokens"]) < 1:
            raise ConfigError("ppo.epochs and ppo.max_new_tokens must be >= 1")
        if lc["enabled"] and float(lc["dropout"]) > 0:
            raise ConfigError("ppo: lora.dropout must be 0 (dropout makes the rollout and update log-probs "
                              "differ: the ratio is no longer 1 before an update)")
        if pc["kl_estimator"] not in ("k1", "k2", "k3"):
            raise ConfigError(f"ppo.kl_estimator: {pc['kl_estimator']!r} is not one of k1, k2, k3")

    # ------------------------------------------------------------------------- jitted pieces
    def _build_fns(self):
        pc = self.cfg["ppo"]
        T, N = float(pc["temperature"]), self.N
        self.experience_fn = make_experience_fn(self.policy_graphdef, self.critic_graphdef, self.rm_graphdef,
                                                temperature=T, eos_ids=self.eos_ids)
        ctl = ppo_math.KLController(bool(pc["adaptive_kl"]), float(pc["kl_target"]), float(pc["kl_horizon"]))
        kind, miss, sclip = pc["kl_estimator"], pc["missing_eos_score"], pc["score_clip"]
        gamma, lam, B = float(pc["gamma"]), float(pc["lam"]), self.B

        def advantages(exp, scores, beta):
            mask = exp["mask"]
            raw = scores.astype(jnp.float32)
            if sclip is not None:
                scores = jnp.clip(scores, -float(sclip), float(sclip))
            if miss is not None:
                scores = jnp.where(exp["has_eos"], scores, jnp.float32(miss))
            kl = ppo_math.kl_estimate(exp["logprobs"], exp["ref_logprobs"], kind) * mask
            rewards, non_score = ppo_math.token_rewards(scores, kl, mask, beta)
            if pc["whiten_rewards"]:
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
        clip, vclip = float(pc["clip"]), float(pc["value_clip"])
        vf_coef, ent_coef = float(pc["vf_coef"]), float(pc["ent_coef"])
        E, M = int(pc["epochs"]), int(pc["minibatches"])
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

            def one(s, rows):
                mb = jax.tree.map(lambda x: x[rows], batch)
                (lp, pst), gp = jax.value_and_grad(pol_loss, has_aux=True)(s["params"], pol_frz, mb)
                (lc, cst), gc = jax.value_and_grad(crit_loss, has_aux=True)(s["critic_params"], crit_frz, mb)
                gnp, gnc = optax.global_norm(gp), optax.global_norm(gc)
                up, new_opt = tx.update(gp, s["opt_state"], s["params"])
                uc, new_copt = ctx.update(gc, s["critic_opt_state"], s["critic_params"])
                finite = jnp.isfinite(lp) & jnp.isfinite(lc) & jnp.isfinite(gnp) & jnp.isfinite(gnc)
                keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
                s = {**s,
                     "params": keep(optax.apply_updates(s["params"], up), s["params"]),
                     "opt_state": keep(new_opt, s["opt_state"]),
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
              "beta": jnp.asarray(float(self.cfg["ppo"]["kl_coef"]), jnp.float32)}
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
    def collect(self, st, step: int):
        """Rollout + advantages for step `step`: (batch dict of device arrays, stats, new beta)."""
        rng = self.step_rng(step)
        prompts = self.step_prompts(step)
        tokens = self.sample(st, prompts, jax.random.fold_in(rng, 0))
        exp = self.experience_fn(st["params"], self.policy_frozen, self.ref_store, st["critic_params"],
                                 self.critic_frozen, self.rm_state, prompts["prompt_ids"], prompts["prompt_mask"],
                                 tokens)
        scores = self.sequence_rewards(exp, prompts["prompt_ids"], tokens)
        adv, stats, new_beta = self.advantages_fn(exp, scores, st["beta"])
        if self.check_fn is not None:  # monitored, never trained on
            stats = {**stats, "check_score": jnp.mean(self._call_reward(prompts["prompt_ids"], tokens, exp["mask"],
                                                                        self.check_fn, "check_fn"))}
        batch = {**exp, **adv, "scores": scores, "prompt_ids": prompts["prompt_ids"]}
        return batch, stats, new_beta

    def iteration(self, st, step: int):
        """One PPO iteration from state `st` (donated); returns (new state, metrics as floats)."""
        t0 = time.perf_counter()
        batch, stats, new_beta = self.collect(st, step)
        jax.block_until_ready(batch["advantages"])
        t1 = time.perf_counter()
        rng = jax.random.fold_in(self.step_rng(step), 1)
        st, ustats = self.update_fn(st, self.policy_frozen, self.critic_frozen, batch, rng)
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


def run(config_path, out: str | None = None, overrides=()) -> dict:
    cfg = load_config(DEFAULTS, config_path, list(overrides))
    return run_config(cfg, out)


def run_config(cfg: dict, out: str | None = None) -> dict:
    run_dir = Path(out or f"runs/{Path(cfg.get('_config_dir', '.')).name}-ppo").absolute()
    trainer = PPOTrainer(cfg)
    print(f"ppo: {trainer.n_prompts} prompts (padded to {trainer.P} tokens), {trainer.B} rollouts x "
          f"{trainer.N} new tokens per step; policy {'LoRA' if trainer.lora else 'full'} "
          f"({trainer.n_policy_params:,} trainable), critic {trainer.n_critic_params:,} trainable; "
          f"reward {cfg['ppo']['reward_model'] or cfg['ppo']['reward_fn']}"
          + (f" (offset {trainer.reward_offset:g})" if trainer.reward_offset else ""))
    result = trainer.run(run_dir)
    result["run_dir"] = str(run_dir)
    result["trainer"] = trainer
    result["model"] = trainer.policy_model(trainer.state)
    return result

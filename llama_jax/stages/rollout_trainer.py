"""What the on-policy RL stages (PPO: `stages.ppo`, GRPO: `stages.grpo`) share, one copy each.

* prompts: `load_prompts` (alpaca / sharegpt / preference records, inline messages or token ids);
* `RolloutTrainer`, the base of both trainers: building the policy (LoRA or full; the reference is
  the same weights with LoRA off, or a frozen copy of the non-LoRA trainables) and the reward
  model, static shapes, step-indexed prompt batches, sampling with the KV-cache decoder, rewards
  (a reward model's normalised score or a reward function on the host), and `run`, the loop
  shell: run dir, config.json, orbax checkpoints, exact resume, metrics.jsonl, tqdm progress,
  the non-finite stop and the test kill hook.

A subclass provides `init_state()`, `iteration(st, step) -> (st, metrics)`, `checkpoint_items`
/ `from_checkpoint_items` (the checkpoint's items; `state` in the training loop's layout so that
`llama-jax export --model RUN_DIR` finds the policy), `checkpoint_meta(st)` and `section`/`task`
(its config section and name).  Exactness: the RNG of step s is fold_in(seed, s), the prompts of
step s are a function of s, and the checkpoint holds everything that changes, so a resumed run
logs exactly what an uninterrupted one does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from .. import lora
from ..data.packing import StepIndexedBatches
from ..data.records import USER, Conversation, Stats, iter_records, prompt_conversation
from ..data.sources import DataError
from ..data.templates import generation_prompt_ids, get_template
from ..generate import decoder, left_pad
from ..rl.rollout import get_reward_fn, reference_store, sample_responses
from ..sharding import batch_sharding, host_batch_to_global, to_host
from ..train.config import ON_ERROR, ConfigError, RunConfig, Section, TrainSection, opt
from ..train.optim import count_params
from ..train.run import RunDir, TrainingError, build_mesh, build_model, build_tokenizer, check_vocab, trainable_filter
from ..rl.rollout import reference_state


# ----------------------------------------------------------------------------- config
@dataclass
class PromptData(Section):
    prompt_files: list[str] = opt([], "json / jsonl: alpaca, sharegpt or preference records; their prompts are used")
    prompts: list[str] = opt([], "inline user messages (rendered with the template)")
    prompt_ids: list[list[int]] = opt([], "inline token-id prompts (toy tasks; no tokenizer needed)")
    template: str = opt("chinese-alpaca-2", "chat template (llama2-chat, chinese-alpaca-2, alpaca, tokenizer)")
    max_prompt_length: int = opt(256, "longer prompts are skipped (counted), never cut")
    max_prompts: int | None = opt(None, "use at most this many prompts")
    on_error: str = opt("skip", "a bad record: skip (counted) or error (stop, naming file, record and field)", ON_ERROR)


@dataclass
class RolloutOptions(Section):
    """What PPO's and GRPO's sections share: the reward and the sampling."""
    reward_model: str | None = opt(None, "HF / llama_jax dir of a head='score' model (frozen) ...")
    reward_fn: str | None = opt(None, "... or a registered reward function (rl.rollout.REWARDS) / 'module:fn'")
    reward_fn_args: dict = opt({}, "given: reward_fn names a factory, called with these keyword arguments once")
    reward_offset: float | str | None = opt("auto", "subtracted from RM scores; auto = the RM dir's reward_offset "
                                            "(llama-jax rm), else 0")
    max_new_tokens: int = opt(64, "tokens sampled per response")
    temperature: float = opt(1.0, "sampling temperature (log-probs use the same)")

    def check(self, where: str = "") -> None:
        name = where.rstrip(".") or "rollout"
        if bool(self.reward_model) == bool(self.reward_fn):
            raise ConfigError(f"{name}: give exactly one of {where}reward_model (a score model) and {where}reward_fn")
        if isinstance(self.reward_offset, str) and self.reward_offset != "auto":
            raise ConfigError(f"{where}reward_offset: {self.reward_offset!r} is not a number, null or auto")
        if not self.temperature > 0:
            raise ConfigError(f"{where}temperature must be > 0 (sampling; log-probs use the same temperature)")
        if self.max_new_tokens < 1:
            raise ConfigError(f"{where}max_new_tokens must be >= 1")


def rl_train(**changes) -> TrainSection:
    """The RL stages' train defaults: one log record and no eval per iteration, linear decay."""
    base = dict(steps=100, batch_size=8, lr=1e-5, schedule="linear", warmup_ratio=0.0, min_lr_ratio=0.0,
                weight_decay=0.0, b1=0.9, b2=0.999, log_every=1, eval_every=0, checkpoint_every=20)
    return TrainSection(**{**base, **changes})


@dataclass
class RolloutConfig(RunConfig):
    data: PromptData = field(default_factory=PromptData, metadata={"doc": "the prompts"})
    train: TrainSection = field(default_factory=rl_train, metadata={"doc": "optimizer, schedule, logging"})


# ----------------------------------------------------------------------------- prompts
def load_prompts(cfg: RolloutConfig, tok, task: str = "PPO") -> tuple[list[list[int]], Stats]:
    """The prompts of a run config's `data` section as token ids, and the loading stats."""
    dc = cfg.data
    stats = Stats()
    out = [list(map(int, p)) for p in dc.prompt_ids]
    stats.add("prompts", len(out))
    if dc.prompts or dc.prompt_files:
        if tok is None:
            raise ConfigError("data.prompts / data.prompt_files need a tokenizer")
        template = get_template(dc.template)
        convs = [Conversation(None, [(USER, str(t))]) for t in dc.prompts]
        if dc.prompt_files:
            convs += [c for _, c in iter_records(cfg.paths(dc.prompt_files), prompt_conversation, stats, dc.on_error)]
        for c in convs:
            ids = generation_prompt_ids(c, tok, template)
            if len(ids) > dc.max_prompt_length:
                stats.add("skipped_too_long")
                continue
            out.append(ids)
            stats.add("prompts")
    if dc.max_prompts:
        out = out[: dc.max_prompts]
    if not out:
        raise DataError(f"{task}: no prompts (data.prompt_files / data.prompts / data.prompt_ids)")
    if any(len(p) == 0 for p in out):
        raise DataError(f"{task}: an empty prompt (every prompt needs at least one token)")
    return out, stats


# ----------------------------------------------------------------------------- helpers
def reward_offset(cfg: RunConfig, opts: RolloutOptions) -> float:
    """reward_offset: a number, null (0), or auto: the normalisation offset the RM stage stores
    with an exported RM (config.json `reward_offset`, or reward_norm.json `offset`), else 0."""
    v = opts.reward_offset
    if v is None:
        return 0.0
    if v != "auto":
        return float(v)
    d = Path(cfg.path(opts.reward_model))
    for name, key in (("config.json", "reward_offset"), ("reward_norm.json", "offset")):
        f = d / name
        if f.is_file():
            val = json.loads(f.read_text()).get(key)
            if val is not None:
                return float(val)
    return 0.0


_subtract = jax.jit(jnp.subtract)


def rows_sharding(x):
    """The sharding of a [B] vector over the rows of `x` (an array or ShapeDtypeStruct, [B, ...])."""
    sh = x.sharding if isinstance(getattr(x, "sharding", None), NamedSharding) else None
    return None if sh is None else NamedSharding(sh.mesh, P(sh.spec[0] if len(sh.spec) else None))


def reference_store_of(trainable):
    """rollout.reference_store, or for an abstract state (the planner's) the same leaves as shapes."""
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(trainable)):
        return nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(trainable)
                                    if not isinstance(v, nnx.LoRAParam)])
    return reference_store(trainable)


# ----------------------------------------------------------------------------- the shared trainer
class RolloutTrainer:
    """Base of PPOTrainer and GRPOTrainer: models, prompts, sampling, rewards and the loop shell."""

    section = "ppo"  # the config section (a RolloutOptions) with the reward and sampling options
    task = "ppo"     # progress bar, checkpoint meta, messages
    progress_keys = ("score", "kl", "response_length")

    @property
    def opts(self) -> RolloutOptions:
        return getattr(self.cfg, self.section)

    # ------------------------------------------------------------------------- construction
    def _load(self, cfg: RolloutConfig):
        """Mesh, tokenizer, prompts, the policy (before LoRA) and the reward model (or None)."""
        rc = self.opts
        self.mesh = build_mesh(cfg)
        # token-id prompts need no tokenizer (toy tasks); text prompts do
        need_tok = bool(cfg.data.prompts or cfg.data.prompt_files)
        self.tok = build_tokenizer(cfg) if need_tok or cfg.tokenizer else None
        prompts, self.prompt_stats = load_prompts(cfg, self.tok, self.task.upper())
        policy = build_model(cfg, self.mesh, vocab_size=len(self.tok) if self.tok is not None else None)
        if self.tok is not None:
            check_vocab(self.tok, policy)
        self.config = policy.config
        V = policy.config.vocab_size
        bad = [p for p in prompts if max(p) >= V or min(p) < 0]
        if bad:
            raise DataError(f"{self.task.upper()}: prompt ids outside the vocabulary [0, {V}): {bad[0]}")
        rm, self.reward_offset = None, 0.0
        if rc.reward_model:
            rm = self.store_reward_model(build_model(cfg.with_model(rc.reward_model), self.mesh, None, head="score"))
            self.reward_offset = reward_offset(cfg, rc)
            if rm.config.vocab_size != V:
                raise ConfigError(f"{self.section}: the reward model has vocab_size {rm.config.vocab_size}, the "
                                  f"policy {V}: they must share the tokenizer")
        self._set_reward_fn()
        return prompts, policy, rm

    def store_reward_model(self, rm):
        """The reward model never trains: its weights in the frozen dtype (model.frozen_dtype, else the
        compute dtype; no float32 master copy) and, with model.quantization, quantized like the
        policy's frozen base; its value head stays float32.  Before a LoRA critic shares its buffers."""
        mc = self.cfg.model
        return lora.store_frozen(rm, full={("score", "kernel")}, frozen_dtype=mc.frozen_dtype,
                                 quantization=mc.quantization, tile=mc.quant_tile or 64)

    def _set_reward_fn(self):
        rc = self.opts
        self.reward_fn = get_reward_fn(rc.reward_fn, rc.reward_fn_args) if rc.reward_fn else None

    def _attach_policy(self, policy, rm):
        """LoRA on the policy (lora.enabled), its trainable / frozen split, the reference store and
        the reward model's split.  Returns the policy's trainable state."""
        pol_filter = trainable_filter(self.cfg, policy)
        self.policy_graphdef, pol_params, self.policy_frozen = nnx.split(policy, pol_filter, ...)
        self.rm_graphdef, self.rm_state = nnx.split(rm) if rm is not None else (None, None)
        # reference = policy with LoRA off; only non-LoRA trainables (full FT) need a frozen copy
        self.ref_store = reference_store_of(pol_params)
        self.n_policy_params = count_params(pol_params)
        self.lora = self.cfg.lora.enabled
        return pol_params

    def _set_shapes(self, prompts, rollouts: int):
        """Pad id, EOS ids and the static shapes: P (padded prompt length), N (response), B (rollouts
        per step).  Returns the left-padded prompts (ids, mask)."""
        self.pad_id = next(x for x in (self.config.pad_token_id, getattr(self.tok, "pad_token_id", None), 0)
                           if x is not None)
        self.eos_ids = self.config.eos_token_ids
        if not self.eos_ids:
            raise ConfigError(f"{self.task.upper()}: the model config has no eos_token_id (responses could never end)")
        ids, mask = left_pad(prompts, self.pad_id)
        self.P, self.N, self.B = ids.shape[1], self.opts.max_new_tokens, int(rollouts)
        if self.P + self.N > self.config.max_position_embeddings and self.config.rope_type != "dynamic":
            raise ConfigError(f"prompt length {self.P} + {self.section}.max_new_tokens {self.N} exceeds the model's "
                              f"max_position_embeddings={self.config.max_position_embeddings}")
        return ids, mask

    def _prompt_batches(self, ids, mask, per_step: int):
        self.n_prompts, self.prompts_per_step = len(ids), int(per_step)
        self.batches = StepIndexedBatches({"prompt_ids": ids, "prompt_mask": mask}, per_step,
                                          self.cfg.train.seed, jax.process_index(), jax.process_count())

    # ------------------------------------------------------------------------- rollouts
    def step_rng(self, step: int):
        return jax.random.fold_in(jax.random.key(self.cfg.train.seed), step)

    # ------------------------------------------------------------------------- the pieces of an iteration
    # An iteration's jitted pieces all run through `call`, its host-side ones through `call_host`,
    # in the order the iteration runs them.  The planner (`llama_jax.plan`) replaces both (and
    # `decoder`) on an abstract trainer, then calls the trainer's own `collect` and `update`: it
    # lowers and compiles each piece on the previous pieces' abstract outputs, so what it measures
    # is the real iteration's pieces in the real order.
    decoder = staticmethod(decoder)  # () -> (jitted decode, hoist_layers) for this platform

    def call(self, name: str, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    def call_host(self, name: str, fn, *args, out):
        """A host-side piece (Python, e.g. a reward function); `out(*args)` gives the abstract
        result for the planner, which cannot run it."""
        return fn(*args)

    def step_prompts(self, step: int, repeat: int = 1) -> dict:
        """Step `step`'s prompts as global arrays (ids, mask, lengths); each row `repeat` times in a
        row (a group)."""
        local = dict(self.batches.batch(step))
        local["prompt_positions"] = np.asarray(local["prompt_mask"]).sum(-1).astype(np.int32)
        if repeat > 1:
            local = {k: np.repeat(np.asarray(v), repeat, axis=0) for k, v in local.items()}
        return host_batch_to_global(local, self.mesh)

    def abstract_prompts(self) -> dict:
        """What step_prompts returns, as ShapeDtypeStructs with their shardings (for the planner)."""
        rows2, rows1 = batch_sharding(self.mesh, 2), batch_sharding(self.mesh, 1)
        ids = jax.ShapeDtypeStruct((self.B, self.P), jnp.int32, sharding=rows2)
        return {"prompt_ids": ids, "prompt_mask": ids,
                "prompt_positions": jax.ShapeDtypeStruct((self.B,), jnp.int32, sharding=rows1)}

    def sample(self, st, prompts: dict, rng):
        """Responses [B, N] sampled from the current policy at <section>.temperature."""
        state = nnx.merge_state(st["params"], self.policy_frozen)
        return sample_responses(self.policy_graphdef, state, self.config, prompts["prompt_ids"],
                                prompts["prompt_mask"], rng, max_new_tokens=self.N,
                                temperature=self.opts.temperature, eos_ids=self.eos_ids,
                                pad_id=self.pad_id, mesh=self.mesh, positions=prompts["prompt_positions"],
                                call=self.call, decoder_fn=self.decoder)

    def sequence_rewards(self, exp: dict, prompt_ids, tokens):
        """[B] float32: the reward function's value, or the reward model's score minus its offset."""
        if self.reward_fn is not None:
            return self.call_host("reward_fn", self._call_reward, prompt_ids, tokens, exp["mask"],
                                  out=lambda p, t, m: jax.ShapeDtypeStruct((t.shape[0],), jnp.float32,
                                                                           sharding=rows_sharding(m)))
        # the normalised RM score
        return self.call("reward_offset", _subtract, exp["scores"], jnp.float32(self.reward_offset))

    def _call_reward(self, prompt_ids, tokens, mask, fn=None, key: str = "reward_fn"):
        """fn (default: the reward function) on the host, checked, back as a [B] device array."""
        p, t, m = to_host(prompt_ids), to_host(tokens), to_host(mask)
        name = f"{self.section}.{key} {getattr(self.opts, key)!r}"
        r = np.asarray((fn or self.reward_fn)(p, t, m), dtype=np.float32)
        if r.shape != (t.shape[0],):
            raise TrainingError(f"{name} returned shape {r.shape}, expected ({t.shape[0]},)")
        if not np.all(np.isfinite(r)):
            raise TrainingError(f"{name} returned non-finite rewards")
        sh = rows_sharding(mask)
        if sh is None:
            return jnp.asarray(r)
        return jax.make_array_from_callback(r.shape, sh, lambda idx: r[idx])

    # ------------------------------------------------------------------------- the loop shell
    def checkpoint_meta(self, st) -> dict:
        return {}

    def run(self, run_dir) -> dict:
        """Iterations from the latest checkpoint of `run_dir` (or 0) to train.steps; returns the last
        logged metrics.  Windowed means over train.log_every iterations go to metrics.jsonl."""
        tc = self.cfg.train
        rd = RunDir(run_dir, self.cfg, self.task)
        st = self.init_state()
        start, restored = rd.restore(self.checkpoint_items(st))  # restored onto st's shardings
        if restored is not None:
            st = self.from_checkpoint_items(restored)
        last, window = {}, []
        with rd.session(start, self.task) as session:
            for step in range(start, tc.steps):
                st, rec = self.iteration(st, step)
                window.append(rec)
                done = step + 1
                if done % tc.log_every == 0 or done == tc.steps:
                    out = {"step": done, **{k: float(np.mean([w[k] for w in window])) for k in window[-1]}}
                    out["nonfinite_updates"] = float(sum(w["nonfinite_updates"] for w in window))
                    out["ratio_maxdev_first"] = float(max(w["ratio_maxdev_first"] for w in window))
                    window = []
                    session.log(out, {k: f"{out[k]:.3f}" for k in self.progress_keys if k in out})
                    last = out
                    if int(st["nonfinite"]) >= tc.max_nonfinite:
                        raise TrainingError(f"{int(st['nonfinite'])} non-finite updates in a row at step {done}; "
                                            "stopping (the last checkpoint holds finite weights)")
                session.step_done(done, lambda: self.checkpoint_items(st),
                                  {"data_position": done * self.prompts_per_step, **self.checkpoint_meta(st)})
        self.state = st
        last["policy_trainable_params"] = self.n_policy_params
        return last

    # ------------------------------------------------------------------------- convenience
    def policy_model(self, st):
        return nnx.merge(self.policy_graphdef, st["params"], self.policy_frozen)

    def reference_model(self, st):

        return nnx.merge(self.policy_graphdef, reference_state(st["params"], self.ref_store), self.policy_frozen)

"""The one training loop every stage runs (pretrain, SFT, reward, DPO).

A stage supplies a `Task`: a loss over a batch and step-indexed batches.  The loop owns the
rest: splitting the model into what trains and what is frozen, the jitted step (gradient
accumulation, clipping, AdamW, NaN/Inf guard) with NamedSharding and donation, eval, progress,
`metrics.jsonl`, and orbax checkpoints from which the same command resumes exactly.

Exactness: the batch of step s is a function of s (data position = s x global batch), the step's
RNG is fold_in(seed, s), and a non-finite step leaves the state untouched, so a resumed run
computes bit for bit what an uninterrupted one does on the same hardware.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ..lora import has_lora, with_dropout_step
from ..scoring import lm_measures
from ..sharding import host_batch_to_global
from .config import RunConfig, TrainSection
from .optim import count_params, init_opt_state, make_optimizer, on_mesh, opt_state_shardings
from .run import RunDir, TrainingError, train_state

log = logging.getLogger(__name__)

# bf16/fp16 peak FLOP/s per chip, for MFU (dense, no sparsity).  Sources: vendor data sheets.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
              "H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class Task:
    """What a stage gives the loop.

    loss_fn(model, batch, rng) -> (loss_sum, weight, aux) where the step loss is
    sum(loss_sum) / sum(weight) over micro-batches and aux is a dict of scalar sums (divided by
    the summed weight when logged).  train.batch(step) returns this host's rows of the global
    batch as numpy arrays; eval_batches likewise (a list, evaluated in full)."""
    name: str
    loss_fn: Callable
    train: Any
    eval_batches: list | None = None
    flops_per_token: float = 0.0
    tokens_per_row: int = 0
    eval_fn: Callable | None = None  # extra eval metrics: fn(model, step) -> dict, host side
    extra_meta: dict = field(default_factory=dict)
    perplexity: bool = True  # eval_ppl = exp(eval_loss) only means something for token losses
    eval_sets: list = field(default_factory=list)  # [EvalSet]: named text sets, logged as eval_<name>_*


@dataclass
class EvalSet:
    """A named language-modelling eval set (e.g. zh / en, to watch forgetting): logged at every eval
    as eval_<name>_loss, _ppl and _bpc (bits per character = summed NLL / ln 2 / characters, with
    characters = predicted tokens x `chars_per_token` of the whole set)."""
    name: str
    batches: list
    chars_per_token: float
    loss_fn: Callable | None = None  # None: the task's own loss (the batches have the task's layout)


@dataclass
class TrainStep:
    """The jitted training step and what it needs, built by `build_train_step` for `train()` and
    for the planner (`llama_jax.plan`), which lowers the very same `step` with abstract inputs."""
    graphdef: Any
    tx: optax.GradientTransformation
    lr_fn: Callable
    mesh: Any
    accum: int
    param_shardings: Any
    state_shardings: Any   # {"step", "params", "opt_state", "nonfinite"}
    frozen_shardings: Any
    batch_sharding: NamedSharding  # every batch leaf: [accum, global batch, ...] split over (data, fsdp)
    step: Callable         # jit(step_fn)(state, frozen, batch) -> (state, metrics); state donated
    eval: Callable         # jit(eval_fn)(params, frozen, batch) -> (loss_sum, weight, aux)

    def init_state(self, params):
        """The initial training state (step 0, fresh optimizer), placed on its shardings."""
        opt = init_opt_state(self.tx, params, self.param_shardings, self.mesh)
        state = train_state(jnp.zeros((), jnp.int32), params, opt, jnp.zeros((), jnp.int32))
        return jax.device_put(state, self.state_shardings)

    def place_frozen(self, frozen):
        return jax.device_put(frozen, self.frozen_shardings)

    def abstract_state(self, params):
        """ShapeDtypeStructs (with shardings) of what init_state returns, without computing it."""
        shapes = train_state(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(self.tx.init, params),
                             jax.ShapeDtypeStruct((), jnp.int32))
        return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes,
                            self.state_shardings)

    def abstract_frozen(self, frozen):
        return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), frozen,
                            self.frozen_shardings)

    def abstract_batch(self, rows: dict):
        """rows: {name: ShapeDtypeStruct [global batch, ...]} -> the step's [accum, micro, ...] inputs."""
        return {k: jax.ShapeDtypeStruct((self.accum, v.shape[0] // self.accum) + tuple(v.shape[1:]), v.dtype,
                                        sharding=self.batch_sharding) for k, v in rows.items()}


def build_train_step(loss_fn: Callable, model, tc: TrainSection, mesh, trainable=nnx.Param):
    """Split `model` into what trains and what is frozen, build the optimizer and the jitted step
    (gradient accumulation, clipping, AdamW, NaN/Inf guard) with its shardings and donation.

    `model` may be concrete or abstract (nnx.eval_shape, leaves ShapeDtypeStructs with shardings):
    the step is the same either way.  Returns (TrainStep, trainable params, frozen state)."""
    graphdef, params, frozen = nnx.split(model, trainable, ...)
    tx, lr_fn = make_optimizer(tc, params)
    accum, seed = tc.grad_accum, tc.seed
    replicated = NamedSharding(mesh, P())
    # optimizer moments follow their parameters' sharding; scalars (step, counts) are replicated
    param_sh = jax.tree.map(lambda x: on_mesh(x, mesh), params)
    shardings = train_state(replicated, param_sh, opt_state_shardings(tx, params, param_sh, mesh), replicated)
    frozen_sh = jax.tree.map(lambda x: on_mesh(x, mesh), frozen)
    batch_sh = NamedSharding(mesh, P(None, ("data", "fsdp")))
    lora_dropout = has_lora(model) and model.lora_config.dropout > 0

    def micro_loss(p, frz, mb, rng, counter=0):
        if lora_dropout:
            frz = with_dropout_step(frz, counter)
        m = nnx.merge(graphdef, p, frz)
        s, w, aux = loss_fn(m, mb, rng)
        return s, (w, aux)

    def step_fn(st, frz, batch):
        rng = jax.random.fold_in(jax.random.key(seed), st["step"])
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def body(carry, xs):
            g_acc, s_acc, w_acc, a_acc = carry
            i, mb = xs
            (s, (w, aux)), g = grad_fn(st["params"], frz, mb, jax.random.fold_in(rng, i),
                                          st["step"] * accum + i + 1)
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            a_acc = {k: a_acc[k] + aux[k] for k in a_acc} if a_acc else aux
            return (g_acc, s_acc + s, w_acc + w, a_acc), None

        if accum == 1:  # no accumulator: a zero-filled copy of every gradient is a pass over the model
            (s, (w, aux)), g = grad_fn(st["params"], frz, jax.tree.map(lambda x: x[0], batch),
                                       jax.random.fold_in(rng, 0), st["step"] + 1)
        else:
            zeros = jax.tree.map(jnp.zeros_like, st["params"])
            _, (_, aux0) = jax.eval_shape(micro_loss, st["params"], frz, jax.tree.map(lambda x: x[0], batch), rng)
            a0 = {k: jnp.zeros(v.shape, v.dtype) for k, v in aux0.items()}
            (g, s, w, aux), _ = jax.lax.scan(body, (zeros, 0.0, 0.0, a0), (jnp.arange(accum), batch))
        w = jnp.maximum(w, 1.0)
        grads = jax.tree.map(lambda x: x / w, g)
        loss = s / w
        gnorm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, st["opt_state"], st["params"])
        new_params = optax.apply_updates(st["params"], updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        out = train_state(st["step"] + 1, keep(new_params, st["params"]), keep(new_opt, st["opt_state"]),
                          jnp.where(finite, 0, st["nonfinite"] + 1))
        metrics = {"loss": loss, "grad_norm": gnorm, "tokens": w, "finite": finite,
                   **{k: v / w for k, v in aux.items()}}
        return out, metrics

    jstep = jax.jit(step_fn, in_shardings=(shardings, frozen_sh, batch_sh), out_shardings=(shardings, None),
                    donate_argnums=(0,))

    ts = TrainStep(graphdef=graphdef, tx=tx, lr_fn=lr_fn, mesh=mesh, accum=accum, param_shardings=param_sh,
                   state_shardings=shardings, frozen_shardings=frozen_sh, batch_sharding=batch_sh, step=jstep,
                   eval=make_eval(graphdef, loss_fn))
    return ts, params, frozen


def make_eval(graphdef, loss_fn: Callable) -> Callable:
    """jit(params, frozen, batch) -> (loss_sum, weight, aux) of `loss_fn` with dropout off."""
    def eval_fn(p, frz, batch):
        m = nnx.merge(graphdef, p, frz)
        m.eval()  # dropout off
        s, w, aux = loss_fn(m, batch, jax.random.key(0))
        return s, w, aux

    return jax.jit(eval_fn)


def peak_flops(tc: TrainSection) -> float | None:
    if tc.peak_flops:
        return tc.peak_flops
    kind = jax.devices()[0].device_kind
    for k, v in PEAK_FLOPS.items():
        if k.lower() in kind.lower():
            return v
    return None


def train(task: Task, model, cfg: RunConfig, run_dir, mesh, trainable=nnx.Param, head: str = "lm") -> dict:
    """Run (or resume) training of `model` in place; returns the last logged and eval metrics."""
    tc = cfg.train
    steps, accum = tc.steps, tc.grad_accum
    if tc.batch_size % (accum * max(1, jax.process_count())):
        raise TrainingError(f"train.batch_size={tc.batch_size} must be divisible by train.grad_accum={accum} "
                            f"x {jax.process_count()} processes")
    rd = RunDir(run_dir, cfg, task.name, head=head)
    ts, params, frozen = build_train_step(task.loss_fn, model, tc, mesh, trainable)
    graphdef, lr_fn, jstep, jeval = ts.graphdef, ts.lr_fn, ts.step, ts.eval
    n_train = count_params(params)
    state = ts.init_state(params)
    frozen = ts.place_frozen(frozen)
    start, restored = rd.restore({"state": state})
    if restored is not None:
        state = restored["state"]

    peak = peak_flops(tc)
    n_dev = jax.device_count()
    last: dict = {}
    pending: list = []
    t_last = time.perf_counter()
    set_evals = {id(es.loss_fn): make_eval(graphdef, es.loss_fn) for es in task.eval_sets if es.loss_fn is not None}

    def run_eval(step):
        rec = {}
        for es in task.eval_sets:
            fn = jeval if es.loss_fn is None else set_evals[id(es.loss_fn)]
            s_tot = w_tot = 0.0
            for b in es.batches:
                s, w, _ = fn(state["params"], frozen, host_batch_to_global(b, mesh))
                s_tot, w_tot = s_tot + float(s), w_tot + float(w)
            rec.update({f"eval_{es.name}_{k}": v
                        for k, v in lm_measures(s_tot, w_tot, w_tot * es.chars_per_token).items()})
        if not task.eval_batches:
            return rec
        s_tot = w_tot = 0.0
        aux_tot: dict = {}
        for b in task.eval_batches:
            s, w, aux = jeval(state["params"], frozen, host_batch_to_global(b, mesh))
            s_tot += float(s)
            w_tot += float(w)
            for k, v in aux.items():
                aux_tot[k] = aux_tot.get(k, 0.0) + float(v)
        loss = s_tot / max(w_tot, 1.0)
        rec["eval_loss"] = loss
        if task.perplexity:
            rec["eval_ppl"] = math.exp(min(loss, 50.0))
        rec.update({f"eval_{k}": v / max(w_tot, 1.0) for k, v in aux_tot.items()})
        if task.eval_fn is not None:
            rec.update(task.eval_fn(nnx.merge(graphdef, state["params"], frozen), step))
        return rec

    post: dict = {}  # the progress bar's fields, kept between log steps
    with rd.session(start, task.name) as session:
        for step in range(start, steps):
            batch = host_batch_to_global(task.train.batch(step), mesh, accum)
            state, m = jstep(state, frozen, batch)
            pending.append(m)
            done = step + 1
            is_last = done == steps
            if done % tc.log_every == 0 or is_last:
                ms = jax.device_get(pending)
                pending = []
                now = time.perf_counter()
                toks = float(sum(x["tokens"] for x in ms))
                rows_tokens = task.tokens_per_row * tc.batch_size * len(ms)
                dt = now - t_last
                t_last = now
                rec = {"step": done, "loss": float(np.mean([x["loss"] for x in ms])), "lr": float(lr_fn(done - 1)),
                       "grad_norm": float(ms[-1]["grad_norm"]), "tokens_per_sec": (rows_tokens or toks) / dt,
                       "step_time": dt / len(ms),
                       "nonfinite_steps": int(sum(not bool(x["finite"]) for x in ms))}
                for k in ms[-1]:
                    if k not in ("loss", "grad_norm", "tokens", "finite"):
                        rec[k] = float(np.mean([x[k] for x in ms]))
                if peak and task.flops_per_token:
                    rec["mfu"] = task.flops_per_token * rec["tokens_per_sec"] / (peak * n_dev)
                if int(state["nonfinite"]) >= tc.max_nonfinite:
                    raise TrainingError(f"{int(state['nonfinite'])} non-finite steps in a row at step {done}; "
                                        "stopping (the last checkpoint holds finite weights)")
                post = {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}", "tok/s": f"{rec['tokens_per_sec']:.0f}"}
                if "mfu" in rec:
                    post["mfu"] = f"{rec['mfu']:.1%}"
            else:
                rec = None
            # eval on its own schedule: a step that is not a logging step gets a record of its own
            if tc.eval_every and (done % tc.eval_every == 0 or is_last):
                rec = {**(rec or {"step": done}), **run_eval(done)}
                if "eval_loss" in rec:
                    post["eval"] = f"{rec['eval_loss']:.4f}"
                for es in task.eval_sets:
                    post[es.name] = f"{rec[f'eval_{es.name}_loss']:.3f}/{rec[f'eval_{es.name}_bpc']:.3f}bpc"
            if rec is not None:
                session.log(rec, dict(post))
                last.update(rec)
            session.step_done(done, lambda: {"state": state},
                              {"data_position": done * tc.batch_size, **task.extra_meta})
    nnx.update(model, state["params"])
    last["trainable_params"] = n_train
    return last

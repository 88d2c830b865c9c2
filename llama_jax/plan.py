"""`llama-jax plan`: ahead-of-time TPU memory and FLOPs plans of the real training steps.

For a stage (pretrain-full, pretrain-lora, sft-lora, ppo), a model preset (llama2-7b/13b/70b) and
a TPU slice, the planner builds the model abstractly (nnx.eval_shape: no weights exist), attaches
LoRA as the stage config says, builds the stage's loss, and lowers and compiles for the slice's
devices (`jax.experimental.topologies`, libtpu, no TPU needed) the very jitted functions the
trainer runs:

* pretrain / SFT: `train.loop.build_train_step(...).step`, the function `train()` calls;
* PPO: the rollout (`generate.prefill` and `generate.decode` with the KV cache, as
  `rl.rollout.sample_responses` calls them), the experience pass, the advantages and the update,
  from `PPOTrainer.abstract`, which shares its construction with `PPOTrainer.__init__`;
* generate: `generate.prefill` (fresh cache) and `generate.decode` as `llama_jax.generate` calls
  them, on bf16 (or weight-only quantized: `quantization`) weights.

Per chip it reports XLA's memory analysis (arguments, outputs, temporaries, donated aliases) and
cost analysis, against the chip's HBM.  A compile that does not fit fails in XLA with
RESOURCE_EXHAUSTED; that is reported as "does not fit" with the compiler's figures.

Needs libtpu, which lives in a separate environment (`make plan-env`, then
`.venv-plan/bin/llama-jax plan ...`): in the main environment its presence would make jax probe for
a TPU at startup.  `--topology cpu` plans for this machine's CPU devices (used by the tests).
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from .config import PRESETS, preset
from .generate import SamplingParams, decode, prefill
from .model import abstract_model
from .quant import quantize_model
from .rl.rollout import cache_maker
from .sharding import make_mesh, parse_mesh, state_shardings
from .stages import ppo, pretrain, sft
from .stages.supervised import flops_per_token
from .stages.ppo import PPOTrainer, critic_lora, critic_source
from .train.config import RunConfig, load_config
from .train.loop import build_train_step
from .train.optim import count_params, on_mesh
from .train.run import trainable_filter

GIB = 1024 ** 3
REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs" / "chinese-llama2-7b"

# Per generation: (topology name prefix, chip_config_name, TensorCores per chip as counted in the
# slice name "vX-N", HBM GiB per chip, bf16 peak FLOP/s per chip).
# HBM per chip from the Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e,
# /v5p, /v6e): v4 32 GiB HBM2, v5e 16 GiB HBM2, v5p 95 GiB HBM2e, v6e (Trillium) 32 GiB HBM.
# v4 and v5p run as one megacore device per chip (two TensorCores), as TPU VMs expose them;
# their slice names count TensorCores (v4-8 = 4 chips), v5e / v6e names count chips (v5e-8 = 8).
GENERATIONS = {
    "v4": ("v4", "megacore", 2, 32, 275e12),
    "v5e": ("v5e", None, 1, 16, 197e12),
    "v5p": ("v5p", "megacore", 2, 95, 459e12),
    "v6e": ("v6e", None, 1, 32, 918e12),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8"}

# stage -> (its module under llama_jax.stages, its config class, config file in CONFIG_DIR)
STAGES = {
    "pretrain-full": (pretrain, pretrain.PretrainConfig, "pretrain-full.yaml"),
    "pretrain-lora": (pretrain, pretrain.PretrainConfig, "pretrain-lora.yaml"),
    "sft-lora": (sft, sft.SFTConfig, "sft-lora.yaml"),
    "ppo": (ppo, ppo.PPOConfig, "ppo.yaml"),
    "generate": (None, sft.SFTConfig, "generate.yaml"),  # model, prompt length, batch: no training
}
DEFAULT_NEW_TOKENS = 512  # generate: decode length
# Chinese-LLaMA-2's merged vocabulary (LLaMA-2's 32,000 + Chinese pieces): the models these
# stages train have been resized to it (llama-jax resize).
DEFAULT_VOCAB = 55296


class PlanError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- topology
@dataclass
class Topology:
    name: str            # e.g. "v5e-8"
    topology: str        # e.g. "v5e:2x4"
    generation: str | None
    devices: list
    hbm_bytes: int | None
    peak_flops: float | None
    usable_hbm_bytes: int | None = None  # what the compiler says it can use (probed)

    @property
    def chips(self) -> int:
        return len(self.devices)


def parse_topology(spec: str) -> tuple[str, str, str]:
    """'v5e:2x4' | 'v5e-8' | 'v5litepod-8' | 'v4-8' | 'v5p:2x2x1' -> (generation, 'gen:AxB[xC]', 'gen-N')."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod|v5lite|v6)([-:])([0-9x]+)", spec.strip().lower())
    if not m:
        raise PlanError(f"--topology {spec!r}: expected e.g. v5e:2x4, v5e-8, v4-8, v5p-16, v6e:4x4 (or cpu)")
    gen = ALIASES.get(m.group(1), m.group(1))
    prefix, _, cores, _, _ = GENERATIONS[gen]
    if m.group(2) == ":":
        dims = m.group(3)
        chips = math.prod(int(d) for d in dims.split("x"))
    else:
        n = int(m.group(3))
        if n % cores:
            raise PlanError(f"--topology {spec}: {gen} slice names count {cores} TensorCores per chip")
        chips = n // cores
        table = SHAPES_3D if cores == 2 else SHAPES_2D
        if chips not in table:
            raise PlanError(f"--topology {spec}: no standard {gen} slice of {chips} chips; give the shape "
                            f"(e.g. {gen}:{next(iter(table.values()))})")
        dims = table[chips]
    return gen, f"{prefix}:{dims}", f"{gen}-{chips * cores}"


def get_topology(spec: str) -> Topology:
    if spec == "cpu":
        return Topology("cpu", "cpu", None, list(jax.devices("cpu")), None, None)
    gen, topo, name = parse_topology(spec)
    try:  # kept local and guarded: a jax build without it still plans for cpu
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover
        raise PlanError(f"jax.experimental.topologies: {e}") from None
    _, chip_config, _, hbm_gib, peak = GENERATIONS[gen]
    kw = {"chip_config_name": chip_config} if chip_config else {}
    if topo.endswith(":1x1"):  # one chip: the default host bounds (2x2x1) do not divide it
        kw["chips_per_host_bounds"] = (1, 1, 1)
    # compile-only: no TPU is touched, so several planners may load libtpu at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topo, **kw)
    except Exception as e:
        raise PlanError(f"TPU topology {topo}: {e} (is libtpu installed? `make plan-env`)") from None
    t = Topology(name, topo, gen, list(desc.devices), hbm_gib * GIB, peak)
    t.usable_hbm_bytes = _probe_usable_hbm(t)
    return t


def _probe_usable_hbm(t: Topology) -> int | None:
    """The HBM the TPU compiler lets a program use (a little under the chip's): compile a program
    that cannot fit and read the figure from its error."""
    sh = NamedSharding(jax.sharding.Mesh(np.asarray(t.devices[:1]), ("x",)), P())
    big = jax.ShapeDtypeStruct((1 << 40,), jnp.int8, sharding=sh)
    try:
        jax.jit(lambda a: a + 1).lower(big).compile()
    except Exception as e:
        m = re.search(r"available HBM \(([0-9.]+)([KMGT])\)", str(e))
        if m:
            return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)
    return None


# ----------------------------------------------------------------------------- abstract models
def with_shardings(model, mesh):
    """Give every leaf of an abstract model a ShapeDtypeStruct with the sharding a concrete model on
    `mesh` gets (by its logical axes, as init_model / load place them); leaves that already carry a
    sharding keep it, small concrete leaves (RNG keys) become replicated ShapeDtypeStructs."""
    graphdef, state = nnx.split(model)
    shs = state_shardings(state, mesh)

    def one(x, sh):
        if isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

    return nnx.merge(graphdef, jax.tree.map(one, state, shs))


def _sds(tree, mesh):
    """Leaves -> ShapeDtypeStructs with the shardings the trainers place them on (train.optim.on_mesh)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_mesh(x, mesh)), tree)


def abstract_stage_model(cfg: RunConfig, mesh, head: str = "lm"):
    """The stage's model, abstract: preset + the config's runtime options (dtype, remat, ...)."""
    mc = cfg.model
    if mc.init not in PRESETS:
        raise PlanError(f"model {mc.init!r}: the planner takes a preset ({', '.join(PRESETS)})")
    runtime = mc.runtime()
    c = preset(mc.init, **mc.overrides, **runtime)
    return with_shardings(abstract_model(c, head=head, mesh=mesh), mesh)


def stage_config(stage: str, model: str, *, vocab_size: int | None = DEFAULT_VOCAB, config: str | None = None,
                 overrides=()) -> RunConfig:
    """The stage's real run config (configs/chinese-llama2-7b/<stage>.yaml) with model.init = `model`."""
    if stage not in STAGES:
        raise PlanError(f"--stage {stage!r}: one of {', '.join(STAGES)}")
    _, cls, fname = STAGES[stage]
    path = Path(config) if config else CONFIG_DIR / fname
    over = [f"model.init={model}"] + ([f"model.overrides.vocab_size={vocab_size}"] if vocab_size else [])
    return load_config(cls, path, over + list(overrides))


# ----------------------------------------------------------------------------- measuring
def chip_bytes(tree) -> int:
    """Bytes of one chip's shards of a tree of ShapeDtypeStructs (the largest shard per leaf)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        try:
            size = np.dtype(x.dtype).itemsize
        except TypeError:  # PRNG key arrays
            size = 8
        total += math.prod(shape) * size
    return total


@dataclass
class Measured:
    name: str
    compile_s: float = 0.0
    args: int = 0
    output: int = 0
    temp: int = 0
    alias: int = 0
    code: int = 0
    flops: float | None = None     # XLA cost analysis, per chip
    resident_extra: int = 0        # buffers alive during the call that are not its arguments (PPO)
    double_counted: int = 0        # argument bytes counted twice (one buffer passed as two arguments)
    error: str | None = None
    mosaic_calls: int = 0          # Pallas TPU kernels (splash attention) in the compiled program
    compiled: object = field(default=None, repr=False)

    @property
    def total(self) -> int:
        """Per-chip bytes while the function runs: its arguments + outputs + temporaries, less
        donated buffers reused for outputs, plus resident buffers it does not take."""
        return (self.args - self.double_counted + self.output + self.temp - self.alias + self.resident_extra)

    def to_dict(self):
        return {"name": self.name, "compile_s": round(self.compile_s, 1), "args_bytes": self.args,
                "output_bytes": self.output, "temp_bytes": self.temp, "alias_bytes": self.alias,
                "code_bytes": self.code, "resident_extra_bytes": self.resident_extra,
                "double_counted_bytes": self.double_counted, "total_bytes": self.total if not self.error else None,
                "xla_flops_per_chip": self.flops, "mosaic_calls": self.mosaic_calls, "error": self.error}


def _oom(e: Exception) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "Ran out of memory" in s or "out of memory" in s.lower()


def compile_one(name: str, lower: Callable[[], object]) -> Measured:
    """lower() -> jax.stages.Lowered; compile it and read XLA's memory / cost analyses."""
    m = Measured(name)
    t0 = time.perf_counter()
    try:
        compiled = lower().compile()
    except Exception as e:
        m.compile_s = time.perf_counter() - t0
        if not _oom(e):
            raise
        m.error = " ".join(str(e).split())[:400]
        return m
    m.compile_s = time.perf_counter() - t0
    m.compiled = compiled
    try:
        m.mosaic_calls = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    except Exception:  # pragma: no cover - text not available for this backend
        pass
    ma = compiled.memory_analysis()
    if ma is not None:
        m.args, m.output, m.temp = ma.argument_size_in_bytes, ma.output_size_in_bytes, ma.temp_size_in_bytes
        m.alias, m.code = ma.alias_size_in_bytes, ma.generated_code_size_in_bytes
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if ca and "flops" in ca:
        m.flops = float(ca["flops"])
    return m


def _outputs(lowered, compiled):
    """A compiled function's outputs as ShapeDtypeStructs with their shardings (to feed the next)."""
    return jax.tree.map(lambda o, sh: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=sh), lowered.out_info,
                        compiled.output_shardings)


# ----------------------------------------------------------------------------- plans
@dataclass
class Plan:
    stage: str
    model: str
    topology: Topology
    mesh: dict
    batch: int
    seq: int
    cfg: RunConfig
    functions: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def limit(self) -> int | None:
        return self.topology.usable_hbm_bytes or self.topology.hbm_bytes

    @property
    def peak(self) -> int | None:
        if any(f.error for f in self.functions):
            return None
        return max(f.total for f in self.functions)

    @property
    def fits(self) -> bool:
        if any(f.error for f in self.functions):
            return False
        return self.limit is None or self.peak <= self.limit

    def to_dict(self):
        t = self.topology
        return {"stage": self.stage, "model": self.model, "topology": t.name, "topology_shape": t.topology,
                "chips": t.chips, "hbm_bytes_per_chip": t.hbm_bytes, "usable_hbm_bytes_per_chip": t.usable_hbm_bytes,
                "mesh": self.mesh, "batch": self.batch, "seq": self.seq, "remat": self.cfg.model.remat,
                "dtype": self.cfg.model.dtype, "param_dtype": self.cfg.model.param_dtype,
                "attention_impl": self.cfg.model.attention_impl, "quantization": self.cfg.model.quantization,
                "grad_accum": self.cfg.train.grad_accum,
                "peak_bytes_per_chip": self.peak, "fits": self.fits, **self.info,
                "functions": [f.to_dict() for f in self.functions]}


def _mesh(cfg: RunConfig, topo: Topology, mesh_override: dict | None):
    shape = dict(mesh_override) if mesh_override else cfg.mesh.to_dict()
    mesh = make_mesh(shape, devices=topo.devices)
    return mesh, {k: int(v) for k, v in mesh.shape.items()}


def plan(stage: str, model: str, topology: Topology | str, *, batch: int | None = None, seq: int | None = None,
         mesh: dict | None = None, vocab_size: int | None = DEFAULT_VOCAB, config: str | None = None,
         overrides=(), cfg: RunConfig | None = None, quantization: str | None = None,
         new_tokens: int | None = None) -> Plan:
    """Lower and compile the stage's jitted step(s) for `topology`; returns the measured Plan.
    quantization: generate: weight-only quantized kernels; LoRA stages: the frozen base's (QLoRA,
    = model.quantization).  new_tokens: generate's decode length (default DEFAULT_NEW_TOKENS)."""
    topo = topology if isinstance(topology, Topology) else get_topology(topology)
    if quantization and stage != "generate":
        overrides = tuple(overrides) + (f"model.quantization={quantization}",)
    cfg = cfg or stage_config(stage, model, vocab_size=vocab_size, config=config, overrides=overrides)
    jmesh, mesh_shape = _mesh(cfg, topo, mesh)
    if stage == "ppo":
        return _plan_ppo(cfg, model, topo, jmesh, mesh_shape, batch, seq)
    if stage == "generate":
        return _plan_generate(cfg, model, topo, jmesh, mesh_shape, batch, seq, quantization, new_tokens)
    return _plan_train(stage, cfg, model, topo, jmesh, mesh_shape, batch, seq)


def _plan_train(stage, cfg, model, topo, mesh, mesh_shape, batch, seq) -> Plan:
    mod = STAGES[stage][0]
    tc = cfg.train
    B = int(batch or tc.batch_size)
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    accum = tc.grad_accum
    if B % (accum * dp):
        raise PlanError(f"batch {B} must be a multiple of grad_accum {accum} x data-parallel size {dp}")
    m = abstract_stage_model(cfg, mesh)
    trainable = trainable_filter(cfg, m)
    # the trainer's step, built by the function train() calls
    ts, params, frozen = build_train_step(mod.make_loss(cfg), m, tc, mesh, trainable)
    rows = mod.batch_spec(cfg, B, seq)
    T = next(iter(rows.values())).shape[1]
    args = (ts.abstract_state(params), ts.abstract_frozen(frozen), ts.abstract_batch(rows))
    p = Plan(stage, model, topo, mesh_shape, B, T, cfg)
    p.functions.append(compile_one("train_step", lambda: ts.step.lower(*args)))
    c = m.config
    p.info = {"vocab_size": c.vocab_size, "trainable_params": count_params(params), "total_params": c.num_params(),
              "model_flops_per_step": flops_per_token(c, T) * B * T, "lora": cfg.lora.enabled,
              "state_bytes_per_chip": chip_bytes(args[0]), "frozen_bytes_per_chip": chip_bytes(args[1])}
    return p


def _plan_generate(cfg, model, topo, mesh, mesh_shape, batch, seq, quantization, new_tokens) -> Plan:
    """`llama_jax.generate`'s two compiled calls on the mesh: the prefill of a fresh KV cache
    (attention within the prompt: the configured kernel) and the `lax.while_loop` decode with the
    donated cache, greedy (sampling adds [B, V] work, no memory that matters).  The cache is made
    as the rollout makes it (`rl.rollout.cache_maker`: stacked for a scanned model on TPU)."""
    B = int(batch or cfg.train.batch_size)
    T = int(seq or cfg.data.max_length)
    N = int(new_tokens or DEFAULT_NEW_TOKENS)
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    if B % dp:
        raise PlanError(f"generate batch {B} must be a multiple of the data-parallel size {dp}")
    m = abstract_stage_model(cfg, mesh)
    if quantization:
        quantize_model(m, quantization, cfg.model.quant_tile or 64)
    c = m.config
    graphdef, state = nnx.split(m)
    p = Plan("generate", model, topo, mesh_shape, B, T, cfg)
    lowered = {}

    def run(name, fn, *args, **kw):
        meas = compile_one(name, lambda: lowered.setdefault(name, fn.lower(*args, **kw)))
        if name != "cache":
            p.functions.append(meas)
        return None if meas.error else _outputs(lowered[name], meas.compiled)

    rows = NamedSharding(mesh, P(("data", "fsdp")))
    prompt = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp"), None)))
    cache = run("cache", cache_maker(c, B, T + N, mesh))
    out = run("prefill", prefill, graphdef, state, prompt, prompt, cache, fresh=True)  # ids, mask: same spec
    if out is not None:
        logits, cache = out
        positions = jax.ShapeDtypeStruct((B,), jnp.int32, sharding=rows)
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P()))
        eos = c.eos_token_ids or (2,)
        run("decode", decode, graphdef, state, cache, logits, positions, key, SamplingParams(N), tuple(eos), 0,
            None, hoist_layers=False)
    weights = chip_bytes(state)
    kv = None if cache is None else chip_bytes((cache.k, cache.v))
    p.info = {"vocab_size": c.vocab_size, "prompt_length": T, "max_new_tokens": N, "quantization": quantization,
              "cache_layers": "scan" if cache is not None and cache.stacked else "unroll",
              "total_params": c.num_params(), "weights_bytes_per_chip": weights, "kv_cache_bytes_per_chip": kv,
              "model_flops_per_step": flops_per_token(c, T + N) / 3.0 * B * (T + N)}
    return p


class _Stopped(Exception):
    """A piece did not fit (its Measured holds the error): the later pieces are not planned."""


def _plan_ppo(cfg, model, topo, mesh, mesh_shape, batch, seq) -> Plan:
    """The PPO trainer's own iteration, abstract: `PPOTrainer.collect` then `.update` on an
    abstract trainer whose `call` lowers and compiles each jitted piece (rollout cache, prefill,
    decode, experience, reward offset, advantages, update) on the previous pieces' abstract outputs.
    The planner adds only what the trainer cannot know: per-chip resident memory beside each piece."""
    pc, tc = cfg.ppo, cfg.train
    if batch:
        cfg = cfg.replace(train=tc.replace(batch_size=int(batch)))
    P_len = int(seq or cfg.data.max_prompt_length)
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    B, M = cfg.train.batch_size, pc.minibatches
    if B % M or (B // M) % dp:
        raise PlanError(f"PPO batch {B}: ppo.minibatches {M} must divide it into minibatches that are a "
                        f"multiple of the data-parallel size {dp}")
    policy = abstract_stage_model(cfg, mesh)
    rm = abstract_stage_model(cfg, mesh, head="score") if pc.reward_model else None
    critic = abstract_stage_model(cfg, mesh, head="score")
    critic_src = critic_source(pc)
    shared = bool(critic_src and critic_lora(cfg) and critic_src == pc.reward_model)  # critic base = RM's buffers
    tr = PPOTrainer.abstract(cfg, mesh, policy, critic, rm, P_len)
    st = tr.abstract_state()  # also makes the trainer's frozen pieces abstract, placed as a run places them
    pol_frz, crit_frz = tr.policy_frozen, tr.critic_frozen
    p = Plan("ppo", model, topo, mesh_shape, tr.B, tr.P, cfg)

    # resident per chip: the state, the frozen bases, the RM, the reference store
    groups = {"state": chip_bytes(st), "policy_frozen": chip_bytes(pol_frz),
              "critic_frozen": 0 if shared else chip_bytes(crit_frz),
              "rm": chip_bytes(tr.rm_state) if tr.rm_state is not None else 0, "ref_store": chip_bytes(tr.ref_store)}
    resident = sum(groups.values())
    policy_bytes = chip_bytes(st["params"]) + groups["policy_frozen"]
    prompts = tr.abstract_prompts()
    # what else is resident while each piece runs: (resident_extra, double_counted)
    beside = {
        "rollout_prefill": (resident - policy_bytes, 0),
        "rollout_decode": (resident - policy_bytes, 0),
        "experience": (groups["state"] - chip_bytes(st["params"]) - chip_bytes(st["critic_params"]),
                       chip_bytes(crit_frz) if shared else 0),
        "advantages": (resident + chip_bytes(prompts["prompt_ids"]), 0),
        "update": (groups["rm"] + groups["ref_store"] - (chip_bytes(crit_frz) if shared else 0), 0),
    }

    def call(name, fn, *args, **kwargs):
        lowered = {}
        m = compile_one(name, lambda: lowered.setdefault("l", fn.lower(*args, **kwargs)))
        if name in beside:  # the others (cache init, reward offset) are compiled for their outputs only
            m.resident_extra, m.double_counted = beside[name]
            p.functions.append(m)
        if m.error:
            raise _Stopped(name)
        return _outputs(lowered["l"], m.compiled)

    tr.call = call
    tr.call_host = lambda name, fn, *args, out: out(*args)
    tr.decoder = lambda: (decode, False)  # the accelerator decoder (the host's may be the CPU variant)
    try:
        batch_, _, _ = tr.collect(st, 0, prompts)
        tr.update(st, batch_, 0)
    except _Stopped:
        pass
    return _ppo_info(p, tr, cfg, groups, resident)


def _ppo_info(p, tr, cfg, groups, resident):
    c, B, Pn, N = tr.config, tr.B, tr.P, tr.N
    pc = cfg.ppo
    fpt = flops_per_token(c, Pn + N) / 3.0  # forward only: 2 N + attention
    E = pc.epochs
    # rollout: prefill + N decode steps (forward); experience: policy, reference, critic (+ RM)
    # forward passes over P + N; update: E epochs of forward + backward of policy and critic
    n_fwd = 3 + (1 if tr.rm_graphdef is not None else 0)
    p.info = {"vocab_size": c.vocab_size, "prompt_length": Pn, "max_new_tokens": N, "minibatches": pc.minibatches, "epochs": E,
              "lora": cfg.lora.enabled, "critic_lora": critic_lora(cfg),
              "policy_trainable_params": tr.n_policy_params, "critic_trainable_params": tr.n_critic_params,
              "total_params": c.num_params(), "resident_bytes_per_chip": resident,
              "resident_groups_bytes_per_chip": groups,
              "model_flops_per_step": fpt * B * (Pn + N) * (1 + n_fwd + 3 * 2 * E)}
    return p


# ----------------------------------------------------------------------------- batch search
def find_largest(fits: Callable[[int], bool], multiple: int, limit: int = 1 << 16) -> tuple[int, list]:
    """Largest multiple of `multiple` (<= limit) for which the monotone predicate `fits` holds:
    doubling from `multiple` until it fails, then bisection between the last success and the first
    failure.  Returns (largest or 0 when even `multiple` fails, [(batch, fits), ...] in call order)."""
    tried = []

    def check(b):
        ok = bool(fits(b))
        tried.append((b, ok))
        return ok

    if not check(multiple):
        return 0, tried
    lo = 1  # in units of `multiple`
    hi = None
    while hi is None:
        if (2 * lo) * multiple > limit:
            return lo * multiple, tried
        if check(2 * lo * multiple):
            lo *= 2
        else:
            hi = 2 * lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if check(mid * multiple):
            lo = mid
        else:
            hi = mid
    return lo * multiple, tried


def batch_multiple(stage: str, cfg: RunConfig, mesh_shape: dict) -> int:
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    if stage == "ppo":
        return cfg.ppo.minibatches * dp
    return cfg.train.grad_accum * dp


def find_batch(stage, model, topology, **kw) -> tuple[Plan | None, int, list]:
    """(plan at the largest global batch that fits, that batch, [(batch, fits), ...])."""
    topo = topology if isinstance(topology, Topology) else get_topology(topology)
    q = kw.get("quantization")
    over = tuple(kw.pop("overrides", ())) + ((f"model.quantization={q}",) if q and stage != "generate" else ())
    cfg = stage_config(stage, model, vocab_size=kw.pop("vocab_size", DEFAULT_VOCAB), config=kw.pop("config", None),
                       overrides=over)
    _, mesh_shape = _mesh(cfg, topo, kw.get("mesh"))
    plans = {}

    def fits(b):
        plans[b] = plan(stage, model, topo, batch=b, cfg=cfg, **kw)
        print(f"  batch {b}: {'fits' if plans[b].fits else 'does not fit'}"
              f" ({_gib(plans[b].peak)} GiB per chip)" if plans[b].peak is not None else
              f"  batch {b}: does not fit (compile: out of memory)", flush=True)
        return plans[b].fits

    best, tried = find_largest(fits, batch_multiple(stage, cfg, mesh_shape))
    return plans.get(best), best, tried


# ----------------------------------------------------------------------------- output
def _gib(b) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def format_plan(p: Plan) -> str:
    t = p.topology
    mesh = ", ".join(f"{k}={v}" for k, v in p.mesh.items())
    mc, lc, accum = p.cfg.model, p.cfg.lora, p.cfg.train.grad_accum
    lines = [f"plan: {p.model} {p.stage} on {t.name} ({t.topology}, {t.chips} chips"
             + (f", {t.hbm_bytes / GIB:.0f} GiB HBM per chip, {_gib(t.usable_hbm_bytes)} GiB usable per XLA"
                if t.hbm_bytes else "") + ")",
             f"  mesh {mesh} (data-parallel {p.mesh['data'] * p.mesh['fsdp']}, parameters fsdp-sharded); "
             f"remat {mc.remat}, compute {mc.dtype}, params {mc.param_dtype}, "
             f"attention {mc.attention_impl or 'xla'}"
             + (f", frozen base {mc.quantization} (tile {mc.quant_tile})" if mc.quantization else "")
             + (f", weights {p.info['quantization']}" if p.info.get("quantization") else "")
             + (f", cached layers {p.info['cache_layers']}" if "cache_layers" in p.info else "")
             + (f", grad_accum {accum}" if accum > 1 else "")
             + (f", LoRA r={lc.rank}" + (f" + {'/'.join(lc.trainable_modules)} in full" if lc.trainable_modules else "")
                if lc.enabled else ", full fine-tuning" if p.stage != "generate" else ""),
             f"  global batch {p.batch} x " + (f"prompt {p.seq} + {p.info.get('max_new_tokens')} new tokens"
                                              if p.stage in ("ppo", "generate") else f"seq {p.seq}")
             + f"; vocab {p.info.get('vocab_size')}"]
    hdr = f"  {'function':<16}{'args':>8}{'output':>8}{'temp':>8}{'alias':>8}{'other':>8}{'total':>8}  GiB/chip  {'XLA GFLOP/chip':>14}  compile"
    lines.append(hdr)
    for f in p.functions:
        if f.error:
            m = re.search(r"temporaries \(([0-9.]+[KMGT]?)\) exceeds available HBM \(([0-9.]+[KMGT]?)\)", f.error)
            why = (f"XLA: {m.group(1)} of temporaries > {m.group(2)} HBM" if m else f.error[:100])
            lines.append(f"  {f.name:<16}does not fit ({why}; compile {f.compile_s:.0f} s)")
            continue
        other = f.resident_extra - f.double_counted
        lines.append(f"  {f.name:<16}{_gib(f.args):>8}{_gib(f.output):>8}{_gib(f.temp):>8}{_gib(f.alias):>8}"
                     f"{_gib(other):>8}{_gib(f.total):>8}            {(f.flops or 0) / 1e9:>14.0f}  {f.compile_s:.0f} s")
    if "state_bytes_per_chip" in p.info:
        lines.append(f"  state (trainable + optimizer) {_gib(p.info['state_bytes_per_chip'])} GiB + frozen "
                     f"{_gib(p.info['frozen_bytes_per_chip'])} GiB per chip; {p.info['trainable_params']:,} trainable "
                     f"of {p.info['total_params']:,} parameters")
    if "kv_cache_bytes_per_chip" in p.info:
        lines.append(f"  weights {_gib(p.info['weights_bytes_per_chip'])} GiB + KV cache "
                     f"{_gib(p.info['kv_cache_bytes_per_chip'])} GiB per chip")
    if "resident_bytes_per_chip" in p.info:
        lines.append(f"  resident between calls {_gib(p.info['resident_bytes_per_chip'])} GiB per chip ("
                     + ", ".join(f"{k} {_gib(v)}" for k, v in p.info["resident_groups_bytes_per_chip"].items()) + ")")
    verdict = ("FITS" if p.fits else "DOES NOT FIT") + (f": peak {_gib(p.peak)} GiB of {_gib(p.limit)} GiB per chip"
                                                       if p.limit and p.peak is not None else "")
    lines.append(f"  => {verdict}")
    if "model_flops_per_step" in p.info:
        mf = p.info["model_flops_per_step"]
        s = f"  model FLOPs per step {mf:.3g} ({mf / max(t.chips, 1):.3g} per chip)"
        if t.peak_flops:
            s += f"; at 100% MFU {mf / (t.peak_flops * t.chips):.3f} s/step"
        lines.append(s)
    lines.append("  (XLA's FLOPs count each while-loop body once: the scanned layers and the decode loop are "
                 "under-counted there)")
    return "\n".join(lines)


def _mesh_arg(s):
    try:
        return parse_mesh(s)
    except ValueError as e:
        raise PlanError(str(e)) from None


def cmd_plan(args) -> int:
    vocab = None if args.vocab_size == 0 else args.vocab_size
    kw = dict(batch=args.batch, seq=args.seq, mesh=_mesh_arg(args.mesh), vocab_size=vocab, config=args.config,
              overrides=args.set or (), quantization=args.quantization, new_tokens=args.new_tokens)
    t0 = time.perf_counter()
    topo = get_topology(args.topology)
    results = []
    if args.find_batch:
        kw.pop("batch")
        print(f"find-batch: {args.model} {args.stage} on {topo.name}", flush=True)
        p, best, tried = find_batch(args.stage, args.model, topo, **kw)
        if p is None:
            print(f"find-batch: not even the smallest batch fits on {topo.name}")
        else:
            print(format_plan(p))
            print(f"largest global batch that fits: {best} (tried {', '.join(f'{b}:{int(ok)}' for b, ok in tried)})")
        results.append({**(p.to_dict() if p else {}), "find_batch": {"largest": best, "tried": tried}})
    else:
        p = plan(args.stage, args.model, topo, **kw)
        print(format_plan(p))
        results.append(p.to_dict())
    print(f"(planned in {time.perf_counter() - t0:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2) + "\n")
    return 0

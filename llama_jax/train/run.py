"""The run layer under every stage: building what a run config names, and the run directory.

`build(cfg)` gives the mesh, tokenizer and model of a `RunConfig` (a preset initialised from
train.seed, or a checkpoint loaded); `trainable_filter(cfg, model)` attaches LoRA (and a bf16 or
quantized frozen base) and says what trains.  `RunDir` owns a run directory: `config.json` (the
resolved config, reloadable with the stage's config class) and `run.json` (stage, head), the orbax
checkpoint manager (resume, save, the latest step's parameters for export), `metrics.jsonl`, the
progress bar and the test kill hook.  The supervised loop (`train.loop.train`) and the RL trainers
(`stages.rollout_trainer`) are short loops over it.

Checkpoint layout: item `state` = {"step", "params", "opt_state", "nonfinite"} (`train_state`) for
every stage, so `llama-jax export --model RUN_DIR` finds the trained parameters of any run; a
stage may add items beside it (PPO: the critic and the KL controller).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from .. import lora
from ..config import PRESETS, preset
from ..fsutil import write_text_atomic
from ..hf import load
from ..model import init_model
from ..sharding import make_mesh
from ..text import load_tokenizer
from .config import ConfigError, RunConfig
from .optim import make_optimizer, on_mesh, opt_state_shardings

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
# test hook: the process kills itself (SIGKILL, no cleanup) after this step, like a preempted VM
KILL_ENV = "LLAMA_JAX_TEST_KILL_AT_STEP"


class TrainingError(RuntimeError):
    pass


def is_primary() -> bool:
    """Process 0: the one that writes shared files (config, metrics, exports)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Multi-host: wait until every process gets here (e.g. for process 0's files); else nothing."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # multi-host only

        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- building
def build_mesh(cfg: RunConfig):
    return make_mesh(cfg.mesh.to_dict())


def tokenizer_path(cfg: RunConfig) -> str | None:
    """`tokenizer`, else model.init when it is a directory (a preset has no tokenizer)."""
    return cfg.path(cfg.tokenizer) or (cfg.path(cfg.model.init) if cfg.model.init not in PRESETS else None)


def build_tokenizer(cfg: RunConfig):
    path = tokenizer_path(cfg)
    if path is None:
        raise ConfigError("tokenizer: required when model.init is a preset")
    if not Path(path).exists():
        raise ConfigError(f"tokenizer: {path} not found")
    return load_tokenizer(path)


def build_model(cfg: RunConfig, mesh, vocab_size: int | None, head: str = "lm"):
    """model.init is a preset (initialised from train.seed) or a checkpoint path (loaded)."""
    mc = cfg.model
    runtime = mc.runtime()
    if mc.init in PRESETS:
        over = dict(mc.overrides)
        if vocab_size is not None:
            over.setdefault("vocab_size", vocab_size)
        return init_model(preset(mc.init, **over, **runtime), seed=cfg.train.seed, head=head, mesh=mesh)
    path = cfg.path(mc.init)
    if not Path(path).exists():
        raise ConfigError(f"model.init: {path} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    return load(path, mesh=mesh, head=head, **runtime)


def check_vocab(tok, model) -> None:
    n = len(tok)
    if n > model.config.vocab_size:
        raise ConfigError(f"tokenizer has {n} tokens but the model's vocab_size is {model.config.vocab_size}: "
                          "resize the model first (llama-jax resize)")


def trainable_filter(cfg: RunConfig, model):
    """LoRA per cfg.lora, then the frozen base in model.frozen_dtype (default: the compute dtype)
    and, with model.quantization (int8 / int4 / nf4), stored quantized (QLoRA).  Returns the
    filter of what trains (every Param without LoRA)."""
    lc, mc = cfg.lora, cfg.model
    if not lc.enabled:
        return nnx.Param
    lora.apply(model, rank=lc.rank, alpha=lc.alpha, targets=tuple(lc.targets), dropout=lc.dropout,
               trainable_modules=tuple(lc.trainable_modules), seed=cfg.train.seed)
    lora.prepare_frozen(model, frozen_dtype=mc.frozen_dtype, quantization=mc.quantization, tile=mc.quant_tile or 64)
    return lora.trainable_filter(model)


@dataclass
class Built:
    mesh: Any
    tokenizer: Any
    model: Any


def build(cfg: RunConfig, head: str = "lm") -> Built:
    """Mesh, tokenizer and model (its vocabulary sized from the tokenizer for a preset), checked
    against each other."""
    mesh = build_mesh(cfg)
    tok = build_tokenizer(cfg)
    model = build_model(cfg, mesh, vocab_size=len(tok), head=head)
    check_vocab(tok, model)
    return Built(mesh, tok, model)


# ----------------------------------------------------------------------------- the state and its checkpoints
def train_state(step, params, opt_state, nonfinite) -> dict:
    """The checkpointed training state of every stage (item `state`)."""
    return {"step": step, "params": params, "opt_state": opt_state, "nonfinite": nonfinite}


def abstract_of(tree):
    """ShapeDtypeStructs (with the leaves' shardings) of a tree of arrays: what a restore fills."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def restore_params(model, cfg: RunConfig, run_dir, trainable=nnx.Param, step: int | None = None) -> int:
    """Load the trainable parameters of a run's latest (or given) checkpoint into `model`; returns the step."""
    import orbax.checkpoint as ocp

    ckpt_dir = Path(run_dir).absolute() / CHECKPOINTS
    mgr = ocp.CheckpointManager(ckpt_dir)
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise TrainingError(f"{ckpt_dir}: no complete checkpoint")
    _, params, _ = nnx.split(model, trainable, ...)
    tx, _ = make_optimizer(cfg.train, params)
    opt = jax.eval_shape(tx.init, params)
    mesh = next((x.sharding.mesh for x in jax.tree.leaves(params)
                 if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
    if mesh is not None:  # moments restored sharded like their parameters, as the loop saved them
        psh = jax.tree.map(lambda x: on_mesh(x, mesh), params)
        opt = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), opt,
                           opt_state_shardings(tx, params, psh, mesh))
    abstract = abstract_of(train_state(jax.ShapeDtypeStruct((), jnp.int32), params, opt,
                                       jax.ShapeDtypeStruct((), jnp.int32)))
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    nnx.update(model, restored["state"]["params"])
    return step


# ----------------------------------------------------------------------------- metrics
class MetricsWriter:
    """metrics.jsonl, one object per logged step; on resume, lines past the checkpoint are dropped."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool = False):
        self.path = run_dir / "metrics.jsonl"
        # only process 0 touches the file: another process replacing it would orphan 0's open handle
        if self.path.exists() and is_primary():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a kill
            write_text_atomic(self.path, "".join(l + "\n" for l in keep))
        self.f = open(self.path, "a") if is_primary() else None
        self.tb = None
        if tensorboard and is_primary():
            self.tb = _tensorboard_writer(run_dir / "tensorboard")

    def write(self, rec: dict):
        if self.f is None:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def close(self):
        if self.f:
            self.f.close()


def _tensorboard_writer(path: Path):
    try:  # optional dependencies, imported only when train.tensorboard is set
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("train.tensorboard: no tensorboardX or torch.utils.tensorboard installed")
            return None
    return SummaryWriter(str(path))


# ----------------------------------------------------------------------------- the run directory
class RunDir:
    """A run directory: created with the resolved config; resume, checkpoints, metrics, progress.

        rd = RunDir(path, cfg, stage="sft")
        start, restored = rd.restore({"state": abstract_state})   # (0, None) on a fresh run
        with rd.session(start, steps) as s:
            for step in range(start, steps):
                ...; s.log(rec, postfix)
                s.step_done(step + 1, lambda: {"state": state}, meta)

    `step_done` advances the progress bar, runs the test kill hook and saves a checkpoint every
    train.checkpoint_every steps and at the last one; leaving the session waits for the save."""

    def __init__(self, path, cfg: RunConfig, stage: str, head: str = "lm", info: dict | None = None):
        import orbax.checkpoint as ocp

        self.path = Path(path).absolute()
        self.cfg, self.stage, self.head = cfg, stage, head
        tc = cfg.train
        self.path.mkdir(parents=True, exist_ok=True)
        if is_primary():
            self.write_config()
            (self.path / RUN_FILE).write_text(json.dumps({"stage": stage, "head": head, **(info or {})}, indent=2)
                                              + "\n")
        self.mgr = ocp.CheckpointManager(self.path / CHECKPOINTS, options=ocp.CheckpointManagerOptions(
            max_to_keep=tc.keep_checkpoints, create=True))
        self.writer: MetricsWriter | None = None
        self.bar = None
        self._kill_at = int(os.environ.get(KILL_ENV, "0") or 0)

    def write_config(self) -> None:
        """config.json: the resolved config (rewritten when a stage resolves more of it, e.g. the
        reward model's converted init)."""
        if is_primary():
            (self.path / CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @staticmethod
    def read(path) -> tuple[dict, dict]:
        """(config.json, run.json) of a run directory, as mappings; run.json of a run written
        before it existed is derived from config.json's `_head`."""
        path = Path(path)
        cfg = json.loads((path / CONFIG_FILE).read_text())
        run = json.loads((path / RUN_FILE).read_text()) if (path / RUN_FILE).exists() else \
            {"head": cfg.pop("_head", "lm")}
        return cfg, run

    @staticmethod
    def is_run(path) -> bool:
        path = Path(path)
        return (path / CHECKPOINTS).is_dir() and (path / CONFIG_FILE).exists()

    # ------------------------------------------------------------------------- checkpoints
    def restore(self, items: dict) -> tuple[int, dict | None]:
        """The latest checkpoint's items, restored onto the shardings of `items` (arrays or
        ShapeDtypeStructs); (0, None) when there is none."""
        import orbax.checkpoint as ocp

        latest = self.mgr.latest_step()
        if latest is None:
            return 0, None
        args = {k: ocp.args.StandardRestore(abstract_of(v)) for k, v in items.items()}
        r = self.mgr.restore(latest, args=ocp.args.Composite(**args))
        out = {k: r[k] for k in items}
        start = int(out["state"]["step"]) if "state" in out else latest
        log.info("resumed from %s step %d", self.path / CHECKPOINTS, start)
        if is_primary():
            print(f"resuming from checkpoint at step {start} ({self.path / CHECKPOINTS})")
        return start, out

    def save(self, step: int, items: dict, meta: dict) -> None:
        import orbax.checkpoint as ocp

        args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
        self.mgr.save(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonSave({"step": step, **meta})))

    def checkpoint_due(self, done: int) -> bool:
        every = self.cfg.train.checkpoint_every
        return (every and done % every == 0) or done == self.cfg.train.steps

    # ------------------------------------------------------------------------- a session of steps
    def session(self, start: int, desc: str | None = None) -> "RunDir":
        tc = self.cfg.train
        self.writer = MetricsWriter(self.path, start, tc.tensorboard)
        if tc.progress and is_primary():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=tc.steps, initial=start, desc=desc or self.stage, dynamic_ncols=True)
        return self

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.mgr.wait_until_finished()
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if self.writer is not None:
                self.writer.close()
                self.writer = None
        return False

    def log(self, rec: dict, postfix: dict | None = None) -> None:
        """One metrics.jsonl record (and the progress bar's fields)."""
        self.writer.write(rec)
        if self.bar is not None and postfix is not None:
            self.bar.set_postfix(postfix, refresh=False)

    def step_done(self, done: int, items: Callable[[], dict], meta: dict) -> None:
        """After step `done`: progress, the kill hook, a checkpoint of items() when due."""
        if self.bar is not None:
            self.bar.update(1)
        if self._kill_at == done:  # die like a preempted VM, no cleanup
            os.kill(os.getpid(), 9)
        if self.checkpoint_due(done):
            self.save(done, items(), {"task": self.stage, **meta})

"""`llama-jax plan`: the planner lowers the trainer's own step; the batch search; the CLI without libtpu.

Runs in the main environment (no libtpu) on the 8 fake CPU devices; the one real TPU compile is
marked slow and skips without libtpu (`make plan-env`)."""
import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from llama_jax import plan as pl
from llama_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the real 7B pretrain-lora config (LoRA r=64 with dropout, embed/lm_head in full, save_dots) on the toy preset
TOY = ["model.overrides.vocab_size=512", "train.batch_size=8", "data.block_size=32", "train.progress=false",
       "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0", "train.steps=1"]


# ----------------------------------------------------------------------------- batch search
@pytest.mark.parametrize("largest,multiple,expect_tried", [
    (40, 8, [(8, True), (16, True), (32, True), (64, False), (48, False), (40, True)]),
    (64, 8, [(8, True), (16, True), (32, True), (64, True), (128, False), (96, False), (80, False), (72, False)]),
    (7, 8, [(8, False)]),
    (8, 8, [(8, True), (16, False)]),
    (100, 4, [(4, True), (8, True), (16, True), (32, True), (64, True), (128, False), (96, True), (112, False),
              (104, False), (100, True)]),
])
def test_find_largest_doubling_then_bisection(largest, multiple, expect_tried):
    best, tried = pl.find_largest(lambda b: b <= largest, multiple)
    assert best == (largest // multiple) * multiple
    assert tried == expect_tried
    assert all(b % multiple == 0 for b, _ in tried)


def test_find_largest_stops_at_limit():
    best, tried = pl.find_largest(lambda b: True, 8, limit=100)
    assert best == 64 and tried == [(8, True), (16, True), (32, True), (64, True)]


def test_topology_names():
    assert pl.parse_topology("v5e:2x4") == ("v5e", "v5e:2x4", "v5e-8")
    assert pl.parse_topology("v5e-8") == ("v5e", "v5e:2x4", "v5e-8")
    assert pl.parse_topology("v5litepod-16") == ("v5e", "v5e:4x4", "v5e-16")
    assert pl.parse_topology("v4-8") == ("v4", "v4:2x2x1", "v4-8")      # v4-8 = 4 chips (8 TensorCores)
    assert pl.parse_topology("v5p-32") == ("v5p", "v5p:2x2x4", "v5p-32")
    assert pl.parse_topology("v6e:4x4") == ("v6e", "v6e:4x4", "v6e-16")
    with pytest.raises(pl.PlanError):
        pl.parse_topology("v5p-6")
    assert pl.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}


# ----------------------------------------------------------------------------- the step is the trainer's
def _cfg():
    return pl.stage_config("pretrain-lora", "toy", vocab_size=None, overrides=TOY)


class _Batches:
    def __init__(self, B, T, V):
        self.B, self.T, self.V = B, T, V

    def batch(self, step):
        r = np.random.default_rng(step)
        seg = np.ones((self.B, self.T), np.int32)
        seg[:, self.T // 2:] = 2  # two documents per row
        pos = np.concatenate([np.arange(self.T // 2), np.arange(self.T - self.T // 2)]).astype(np.int32)
        return {"tokens": r.integers(1, self.V, (self.B, self.T)).astype(np.int32), "segments": seg,
                "positions": np.broadcast_to(pos, (self.B, self.T)).copy()}


class _Built(Exception):
    pass


def test_train_and_planner_lower_the_same_step(tmp_path, monkeypatch):
    """train() gets its step from build_train_step; the planner's lowering of that builder from
    nothing but the config (abstract model, abstract LoRA, the stage's loss, ShapeDtypeStruct
    batch) is the very HLO train() runs, and it compiles on the 8 CPU devices with a non-empty
    memory analysis."""
    from llama_jax.stages import pretrain
    from llama_jax.train.run import build_mesh, build_model, trainable_filter

    cfg = _cfg()
    mesh = build_mesh(cfg)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    calls = []
    real_build = loop.build_train_step

    def spy(loss_fn, model, tc, mesh_, trainable):
        ts, params, frozen = real_build(loss_fn, model, tc, mesh_, trainable)
        calls.append((loss_fn, ts, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                                (ts.init_state(params), ts.place_frozen(frozen)))))
        raise _Built  # train() has its step; no need to run it here (test_pretrain* do)

    monkeypatch.setattr(loop, "build_train_step", spy)
    model = build_model(cfg, mesh, vocab_size=None)
    trainable = trainable_filter(cfg, model)
    B, T = cfg.train.batch_size, cfg.data.block_size
    task = loop.Task(name="pretrain", loss_fn=pretrain.make_loss(cfg), train=_Batches(B, T, 512))
    with pytest.raises(_Built):
        loop.train(task, model, cfg, tmp_path / "run", mesh, trainable=trainable)
    assert len(calls) == 1 and calls[0][0] is task.loss_fn
    _, ts, (state, frozen) = calls[0]
    batch = ts.abstract_batch({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in task.train.batch(0).items()})
    train_hlo = ts.step.lower(state, frozen, batch).as_text()

    # the planner, from nothing but the config: abstract model, LoRA, loss, batch spec
    monkeypatch.setattr(loop, "build_train_step", real_build)
    lowered = {}
    orig_compile_one = pl.compile_one

    def capture(name, lower):
        lowered[name] = lower()
        return orig_compile_one(name, lambda: lowered[name])

    monkeypatch.setattr(pl, "compile_one", capture)
    p = pl.plan("pretrain-lora", "toy", "cpu", cfg=cfg)
    assert lowered["train_step"].as_text() == train_hlo
    f = p.functions[0]
    assert f.name == "train_step" and f.error is None and f.args > 0 and f.temp > 0 and f.alias > 0
    assert p.fits and p.batch == B and p.seq == T and p.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
    # the state's optimizer moments are sharded like their parameters (not replicated)
    assert p.info["state_bytes_per_chip"] < 0.5 * pl.chip_bytes(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
    assert "train_step" in pl.format_plan(p)


def test_ppo_plan_walks_the_trainers_own_iteration(monkeypatch):
    """The PPO plan is PPOTrainer.collect + .update run on an abstract trainer: every jitted piece the
    iteration calls is lowered, in the iteration's order, on the previous pieces' outputs, and the
    update gets the very batch collect() builds."""
    from llama_jax.stages.ppo import PPOTrainer

    over = ["model.overrides.vocab_size=512", "ppo.max_new_tokens=8", "model.remat=none", "model.attention_impl=xla",
            "model.dtype=float32", "model.param_dtype=float32", "lora.dropout=0.0"]
    seen = []
    real_collect = PPOTrainer.collect

    def collect(self, st, step, prompts=None):
        out = real_collect(self, st, step, prompts)
        seen.append([k for k in out[0]])  # the batch the update gets
        return out

    monkeypatch.setattr(PPOTrainer, "collect", collect)
    p = pl.plan("ppo", "toy", "cpu", batch=32, seq=16, vocab_size=None, overrides=over)
    assert [f.name for f in p.functions] == ["rollout_prefill", "rollout_decode", "experience", "advantages", "update"]
    assert all(f.error is None and f.total > 0 for f in p.functions)
    assert p.info["prompt_length"] == 16 and p.info["max_new_tokens"] == 8 and p.batch == 32
    assert seen and {"advantages", "returns", "scores", "tokens", "mask"} <= set(seen[0])


def test_moments_follow_parameter_shardings():
    from jax.sharding import NamedSharding, PartitionSpec as P

    from llama_jax.sharding import make_mesh
    from llama_jax.train.config import TrainSection
    from llama_jax.train.optim import init_opt_state, make_optimizer, on_mesh

    mesh = make_mesh({"fsdp": -1})
    w = jax.device_put(np.ones((16, 8), np.float32), NamedSharding(mesh, P("fsdp")))
    for lora_lr in (None, 1e-3):  # plain AdamW and the multi_transform with LoRA labels
        params = {"lora": {"w": w}, "full": {"w": w, "norm": np.ones(8, np.float32)}}
        tx, _ = make_optimizer(TrainSection(lora_lr=lora_lr), params)
        psh = jax.tree.map(lambda x: on_mesh(x, mesh), params)
        opt = init_opt_state(tx, params, psh, mesh)
        shapes = [(x.shape, x.sharding.spec) for x in jax.tree.leaves(opt)]
        assert ((16, 8), P("fsdp")) in shapes and all(s == P() for sh, s in shapes if sh != (16, 8))


# ----------------------------------------------------------------------------- CLI
def test_cli_without_libtpu_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec("libtpu") is not None:
        pytest.skip("libtpu is installed here")
    from llama_jax import cli

    monkeypatch.setattr(cli, "PLAN_VENV", tmp_path / "no-venv")  # no re-exec
    assert cli.main(["plan", "--model", "llama2-7b", "--stage", "sft-lora", "--topology", "v5e:2x4"]) == 2
    err = capsys.readouterr().err
    assert "libtpu is not installed" in err and "make plan-env" in err


# ----------------------------------------------------------------------------- real TPU compile
PLAN_PY = os.path.join(REPO, ".venv-plan", "bin", "python")


@pytest.mark.skipif(not os.path.exists(PLAN_PY), reason="no .venv-plan with libtpu (`make test` builds it: make plan-env)")
def test_tpu_lowering_with_splash(tmp_path):
    """A real TPU compile (libtpu, no TPU) in .venv-plan through the CLI, small enough for every
    `make test`: the toy preset's LoRA pretraining step at 256 tokens on a v5e-4 with
    attention_impl=splash lowers the Pallas splash kernel (Mosaic custom calls in the compiled
    program: forward, dq and dkv kernels) and fits; with attention_impl=xla it has none."""
    import json

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)

    def run(*args):
        out = tmp_path / "p.json"
        r = subprocess.run([PLAN_PY, "-m", "llama_jax.cli", "plan", *args, "--json", str(out)], capture_output=True,
                           text=True, cwd=REPO, env=env, timeout=1200)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(out.read_text()), r.stdout

    common = ("--model", "toy", "--stage", "pretrain-lora", "--topology", "v5e-4", "--batch", "4", "--seq", "256",
              "--vocab-size", "0", "--set", "model.overrides.num_hidden_layers=1")
    d, stdout = run(*common, "--set", "model.attention_impl=splash")
    assert d["fits"] and d["chips"] == 4 and 0 < d["peak_bytes_per_chip"] < 2**30 and "FITS" in stdout
    assert d["attention_impl"] == "splash" and d["functions"][0]["mosaic_calls"] >= 3
    assert 15 * 2**30 < d["usable_hbm_bytes_per_chip"] < 16 * 2**30 == d["hbm_bytes_per_chip"]
    d, _ = run(*common, "--set", "model.attention_impl=xla")
    assert d["fits"] and d["functions"][0]["mosaic_calls"] == 0


@pytest.mark.skipif(not os.path.exists(PLAN_PY), reason="no .venv-plan with libtpu (`make test` builds it: make plan-env)")
def test_tpu_generate_plan_scans_the_cached_layers_with_splash_prefill(tmp_path):
    """`--stage generate` compiled for a v5e-4: on TPU the cached layers are scanned (one stacked KV
    cache) and the fresh-cache prefill runs the splash kernel once, in the one compiled layer body
    of the 4-layer model (unrolled, it would be 4 kernels); the KV cache is counted per chip."""
    import json

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    out = tmp_path / "g.json"
    r = subprocess.run([PLAN_PY, "-m", "llama_jax.cli", "plan", "--model", "toy", "--stage", "generate",
                        "--topology", "v5e-4", "--batch", "64", "--seq", "256", "--new-tokens", "256",
                        "--vocab-size", "512", "--set", "model.overrides.num_hidden_layers=4", "--json", str(out)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["fits"] and d["cache_layers"] == "scan" and [f["name"] for f in d["functions"]] == ["prefill", "decode"]
    prefill, decode = d["functions"]
    assert prefill["mosaic_calls"] == 1 and decode["mosaic_calls"] == 0
    # toy: 4 layers x 2 (k, v) x 16 rows per chip x 512 slots x 2 kv heads x head_dim 16 x bf16
    assert d["kv_cache_bytes_per_chip"] == 4 * 2 * 16 * 512 * 2 * 16 * 2
    # a bound, not the layout comparison (at toy size both layouts stay below it; the copy the
    # [B, L, K, S, D] layout caused was measured on 7B, docs/plan.md)
    assert decode["temp_bytes"] < d["kv_cache_bytes_per_chip"]
    assert "cached layers scan" in r.stdout


def test_generate_plan_on_cpu_devices():
    """The generate plan's pieces on the 8 fake CPU devices, both cache layouts: the unrolled one
    (CPU's default) and the scanned one; int8 weights shrink the weights per chip."""
    kw = dict(batch=8, seq=32, new_tokens=16, vocab_size=512)
    plans = {cl: pl.plan("generate", "toy", "cpu", overrides=(f"model.cache_layers={cl}",), **kw)
             for cl in ("unroll", "scan")}
    for cl, p in plans.items():
        assert [f.name for f in p.functions] == ["prefill", "decode"] and p.fits and p.info["cache_layers"] == cl
        assert p.info["max_new_tokens"] == 16 and p.info["prompt_length"] == 32
    assert plans["scan"].info["kv_cache_bytes_per_chip"] == plans["unroll"].info["kv_cache_bytes_per_chip"] == (
        2 * 2 * 1 * 48 * 2 * 16 * 2)  # layers x (k, v) x row per chip x slots x kv heads x head_dim x bf16
    q = pl.plan("generate", "toy", "cpu", quantization="int8", **kw)
    # int8 kernels are half of bf16; the embedding, norms and per-channel float32 scales stay (toy: 76%)
    assert q.info["weights_bytes_per_chip"] < 0.8 * plans["unroll"].info["weights_bytes_per_chip"]
    assert "weights int8" in pl.format_plan(q)

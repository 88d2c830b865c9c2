"""This machine's measured fp32 matmul peak (jnp.dot) and memory read bandwidth (jitted jnp.sum).

These are the denominators of the other benchmarks: model-FLOPs utilisation in train_step.py is
achieved FLOP/s / matmul_peak(), and the decode bound in decode.py is bytes-per-step /
read_bandwidth().  Both are "best of several" (the least disturbed repetition), measured with all
cores XLA uses by default (its Eigen/intra-op pool is sized to the machine's cores).

    .venv/bin/python scripts/bench/peak.py [--json out.json] [--torch]

Importable: matmul_peak(), read_bandwidth(), measure().
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def _best_time(fn, reps: int) -> tuple[float, list[float]]:
    fn()  # compile / warm caches
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), ts


def matmul_peak(sizes=(2048, 4096), reps: int = 5) -> dict:
    """fp32 jnp.dot of n x n by n x n; FLOP/s = 2 n^3 / best time.  Returns per-size and max."""
    import jax
    import jax.numpy as jnp

    per = {}
    f = jax.jit(jnp.dot)
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        best, ts = _best_time(lambda: f(a, b).block_until_ready(), reps if n <= 2048 else max(2, reps - 2))
        per[n] = {"flops_per_s": 2 * n ** 3 / best, "best_s": best, "times_s": ts}
    return {"per_size": per, "peak_flops_per_s": max(v["flops_per_s"] for v in per.values())}


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 7) -> dict:
    """Bytes/s of a jitted full reduction (jnp.sum) over an fp32 array of `nbytes` (default 1 GiB,
    far beyond any cache).  Also a 2-row split of the same reduction (x.reshape(2, -1).sum(1)),
    which XLA may run with more parallelism; the max of the two is reported."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    variants = {"jnp.sum(x)": jax.jit(jnp.sum), "x.reshape(2,-1).sum(1)": jax.jit(lambda x: x.reshape(2, -1).sum(1))}
    per = {}
    for name, f in variants.items():
        best, ts = _best_time(lambda: f(x).block_until_ready(), reps)
        per[name] = {"bytes_per_s": x.nbytes / best, "best_s": best, "times_s": ts}
    return {"nbytes": nbytes, "per_variant": per, "read_bytes_per_s": max(v["bytes_per_s"] for v in per.values())}


def torch_reference(sizes=(2048, 4096), nbytes: int = 1 << 30, reps: int = 5) -> dict:
    """The same two probes with PyTorch (its own BLAS; torch.get_num_threads() threads), for context."""
    import torch

    out = {"threads": torch.get_num_threads(), "matmul": {}}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        best, _ = _best_time(lambda: a @ b, reps if n <= 2048 else max(2, reps - 2))
        out["matmul"][n] = 2 * n ** 3 / best
    x = torch.ones(nbytes // 4)
    best, _ = _best_time(lambda: x.sum(), reps)
    out["sum_bytes_per_s"] = nbytes / best
    return out


def measure(sizes=(2048, 4096), nbytes: int = 1 << 30, with_torch: bool = False) -> dict:
    import jax

    res = {"machine": common.machine_info(), "jax_devices": [str(d) for d in jax.devices()],
           "foreign_load_before_cores": common.foreign_load_now(1.0)}
    t0 = time.perf_counter()
    res["matmul"] = matmul_peak(sizes)
    res["bandwidth"] = read_bandwidth(nbytes)
    if with_torch:
        res["torch"] = torch_reference(sizes, nbytes)
    res["foreign_load_after_cores"] = common.foreign_load_now(1.0)
    res["wall_s"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------- worker: a dot probe
def _worker_setup(spec):
    """Used by train_step.py to interleave a peak probe with the training steps."""
    import jax
    import jax.numpy as jnp

    n = spec.get("n", 2048)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()

    reps = spec.get("reps", 3)

    def step():  # best of `reps` dots
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f(a, b).block_until_ready()
            ts.append(time.perf_counter() - t0)
        return {"best_s": min(ts)}
    return step, {"flops_per_call": 2 * n ** 3}


def table(res: dict) -> str:
    rows = []
    for n, v in res["matmul"]["per_size"].items():
        rows.append([f"jnp.dot fp32 {n}x{n}", common.fmt(v["flops_per_s"] / 1e9), "GFLOP/s"])
    for name, v in res["bandwidth"]["per_variant"].items():
        rows.append([f"{name}, {res['bandwidth']['nbytes'] / 2**30:.0f} GiB fp32", common.fmt(v["bytes_per_s"] / 1e9),
                     "GB/s"])
    rows.append(["**matmul peak (max)**", common.fmt(res["matmul"]["peak_flops_per_s"] / 1e9), "GFLOP/s"])
    rows.append(["**read bandwidth (max)**", common.fmt(res["bandwidth"]["read_bytes_per_s"] / 1e9), "GB/s"])
    if "torch" in res:
        t = res["torch"]
        for n, v in t["matmul"].items():
            rows.append([f"(context) torch.matmul fp32 {n}x{n}, {t['threads']} threads", common.fmt(v / 1e9), "GFLOP/s"])
        rows.append(["(context) torch.sum 1 GiB fp32", common.fmt(t["sum_bytes_per_s"] / 1e9), "GB/s"])
    rows.append(["foreign load before / after (cores)",
                 f"{res['foreign_load_before_cores']:.2f} / {res['foreign_load_after_cores']:.2f}", ""])
    return common.markdown_table(["probe", "value", "unit"], rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--sizes", default="2048,4096", help="square matmul sizes")
    ap.add_argument("--gib", type=float, default=1.0, help="array size for the bandwidth probe")
    ap.add_argument("--torch", action="store_true", help="also run the PyTorch probes (context only)")
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="wait up to this many seconds for other processes to go idle first")
    args = ap.parse_args(argv)
    if args.wait_quiet:
        common.wait_for_quiet(args.wait_quiet)
    res = measure(tuple(int(s) for s in args.sizes.split(",")), int(args.gib * 2 ** 30), args.torch)
    print(table(res))
    print(json.dumps({"peak_flops_per_s": res["matmul"]["peak_flops_per_s"],
                      "read_bytes_per_s": res["bandwidth"]["read_bytes_per_s"]}))
    common.write_json(args.json, res)
    return res


if __name__ == "__main__":
    if common.is_worker():
        common.worker_main(_worker_setup)
    else:
        main()

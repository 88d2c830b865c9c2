"""Shared helpers for the side-by-side benchmarks in scripts/bench.

The benchmarks run each contender (a llama_jax variant, the transformers/PyTorch peer, a matmul
peak probe) in its own worker process and *interleave* them: round r runs contender A, then B,
then C, ... and the next round starts again at A.  Reasons:

* XLA flags (XLA_FLAGS) are read once per process, so flag variants need their own process;
* a contender's idle thread pool (OpenMP spin-wait, Eigen) cannot steal cycles from the other;
* on a shared machine the background load drifts over minutes.  Interleaving exposes every
  contender to the same drift, and ratios are taken per round (paired), then the median.

Each timed sample also records the *foreign* CPU load during it: busy CPU time of the whole
machine (/proc/stat) minus the CPU time of the worker being timed (/proc/<pid>/task/*/stat),
in cores.  A value near 0 means the sample had the machine to itself.

Worker protocol (line based, stdout lines starting with "@@" are protocol, everything else is
passed through to stderr):  worker prints  @@READY {json}  after setup; the coordinator sends
"run N" and gets  @@RESULT {json}  back (json has "times": [N wall-clock seconds]); "quit" ends.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
HZ = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- CPU accounting
def _machine_busy_ticks() -> int:
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    # user nice system idle iowait irq softirq steal guest guest_nice
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])
    return total - idle


def _proc_ticks(pid: int) -> int:
    """utime + stime of all threads of pid (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        fields = s[s.rfind(")") + 2:].split()
        return int(fields[11]) + int(fields[12])  # utime, stime (whole thread group)
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0


class CpuMeter:
    """Foreign load (cores) while our processes `pids` ran: (machine busy - ours) / wall."""

    def __init__(self, pids):
        self.pids = list(pids)

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.m0 = _machine_busy_ticks()
        self.p0 = sum(_proc_ticks(p) for p in self.pids)
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        machine = (_machine_busy_ticks() - self.m0) / HZ
        ours = (sum(_proc_ticks(p) for p in self.pids) - self.p0) / HZ
        self.wall = wall
        self.ours_cores = ours / wall if wall > 0 else 0.0
        self.foreign_cores = max(0.0, (machine - ours) / wall) if wall > 0 else 0.0
        return False


def foreign_load_now(seconds: float = 1.0) -> float:
    """Cores busy with other processes over the next `seconds` (this process excluded)."""
    with CpuMeter([os.getpid()]) as m:
        time.sleep(seconds)
    return m.foreign_cores


def wait_for_quiet(max_wait_s: float = 0.0, threshold_cores: float = 0.3, log=print) -> float:
    """Wait (up to max_wait_s) until foreign load drops below threshold; returns the last reading."""
    t_end = time.time() + max_wait_s
    while True:
        load = foreign_load_now(1.0)
        if load < threshold_cores or time.time() >= t_end:
            return load
        log(f"[bench] machine busy with other processes ({load:.2f} cores); waiting ...")
        time.sleep(0.5)


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "loadavg": open("/proc/loadavg").read().split()[:3]}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
        info["simd"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    except (OSError, StopIteration):
        pass
    try:
        import importlib.metadata as md
        info["versions"] = {p: md.version(p) for p in ("jax", "jaxlib", "flax", "optax", "torch", "transformers")
                            if _has_dist(md, p)}
    except Exception:  # noqa: BLE001 - informational only
        pass
    info["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    return info


def _has_dist(md, name):
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


# ----------------------------------------------------------------------------- workers
class Worker:
    """A benchmark contender running in its own Python process (see module docstring)."""

    def __init__(self, name: str, script: str | Path, spec: dict, env: dict | None = None, log=print):
        self.name, self.spec, self.log = name, spec, log
        full_env = dict(os.environ)
        full_env.pop("XLA_FLAGS", None)
        full_env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                         "TF_CPP_MIN_LOG_LEVEL": "2"})
        full_env.update(env or {})
        self.env = {k: v for k, v in (env or {}).items()}
        self.proc = subprocess.Popen(
            [PYTHON, "-u", str(script), "--worker", json.dumps(spec)], cwd=str(REPO), env=full_env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self._stderr_tail: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.ready = None

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self._stderr_tail = (self._stderr_tail + [line.rstrip()])[-40:]

    def _read_msg(self, tag: str) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                raise RuntimeError(f"worker {self.name} died (rc={self.proc.returncode}):\n" +
                                   "\n".join(self._stderr_tail))
            if line.startswith("@@" + tag + " "):
                return json.loads(line[len(tag) + 3:])
            if line.strip():
                self.log(f"[{self.name}] {line.rstrip()}")

    def wait_ready(self) -> dict:
        if self.ready is None:
            self.ready = self._read_msg("READY")
        return self.ready

    def run(self, n: int = 1) -> dict:
        """n timed repetitions; adds the foreign load during them."""
        self.wait_ready()
        with CpuMeter([self.proc.pid]) as m:
            self.proc.stdin.write(f"run {n}\n")
            self.proc.stdin.flush()
            res = self._read_msg("RESULT")
        res["foreign_cores"] = m.foreign_cores
        res["our_cores"] = m.ours_cores
        return res

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()


def worker_main(setup):
    """Body of a worker process.  setup(spec) -> (step_fn, ready_info); step_fn() returns after
    one complete, synchronised repetition (and may return a dict of extra info)."""
    spec = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    step, info = setup(spec)
    print("@@READY " + json.dumps(info), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "quit":
            break
        if cmd[0] == "run":
            times, extra = [], None
            for _ in range(int(cmd[1])):
                t0 = time.perf_counter()
                extra = step()
                times.append(time.perf_counter() - t0)
            out = {"times": times}
            if isinstance(extra, dict):
                out.update(extra)
            print("@@RESULT " + json.dumps(out), flush=True)


def interleave(workers: list[Worker], rounds: int, per_round: int = 1, log=print,
               deadline: float | None = None, quiet_wait_s: float = 0.0) -> dict[str, list[dict]]:
    """Round-robin timing.  Returns {worker name: [result per round]}.  Before each sample, waits
    up to `quiet_wait_s` for the other processes on the machine to go idle (a shared machine:
    quiet samples are the ones reported, see quiet_samples).  Stops early (keeping at least 2
    rounds) when time.time() passes `deadline`."""
    out = {w.name: [] for w in workers}
    for r in range(rounds):
        for w in (workers if r % 2 == 0 else workers[::-1]):  # ABC CBA ... (balanced order)
            if quiet_wait_s > 0:
                wait_for_quiet(quiet_wait_s, log=lambda *_: None)
            res = w.run(per_round)
            out[w.name].append(res)
            log(f"[bench] round {r + 1}/{rounds} {w.name}: "
                f"{', '.join(f'{t:.3f}s' for t in res['times'])} (foreign load {res['foreign_cores']:.2f} cores)")
        if deadline is not None and r >= 1 and time.time() > deadline:
            log(f"[bench] time budget reached after {r + 1} rounds")
            break
    return out


QUIET_CORES = 0.3  # a sample counts as quiet when other processes used less than this many cores


def timed_trainer(make, warmup: int):
    """An RL trainer (PPO / GRPO) built by make() and its iteration, timed the same way in every
    benchmark: returns (trainer, one() -> the next iteration's metrics (state kept, waited for),
    setup seconds, the first iteration's metrics, its seconds (compiles included), the warm-up
    iterations' metrics)."""
    import jax

    t0 = time.perf_counter()
    tr = make()
    state = {"st": tr.init_state(), "step": 0}
    setup_s = time.perf_counter() - t0

    def one():
        st, rec = tr.iteration(state["st"], state["step"])
        jax.block_until_ready(st)
        state["st"], state["step"] = st, state["step"] + 1
        return rec

    t0 = time.perf_counter()
    first = one()
    first_s = time.perf_counter() - t0
    return tr, one, setup_s, first, first_s, [one() for _ in range(warmup)]


def quiet_samples(samples: list[dict], threshold: float = QUIET_CORES) -> tuple[list[int], bool]:
    """Indices of one contender's samples to summarise: its quiet ones if there are at least 2,
    else all of them (then flagged contended=True)."""
    q = [i for i, x in enumerate(samples) if x["foreign_cores"] < threshold]
    return (q, False) if len(q) >= 2 else (list(range(len(samples))), True)


def paired_quiet(a: list[dict], b: list[dict], threshold: float = QUIET_CORES) -> tuple[list[int], bool]:
    """Rounds in which both contenders' samples were quiet (at least 1), else all rounds (flagged)."""
    n = min(len(a), len(b))
    q = [i for i in range(n) if a[i]["foreign_cores"] < threshold and b[i]["foreign_cores"] < threshold]
    return (q, False) if q else (list(range(n)), True)


# ----------------------------------------------------------------------------- stats / output
def med(xs):
    return statistics.median(xs) if xs else float("nan")


def sample_times(results: list[dict]) -> list[float]:
    """Per round: the median of that round's repetitions."""
    return [med(r["times"]) for r in results]


def paired_ratio(num: list[float], den: list[float]) -> float:
    """median over rounds of num[i] / den[i]."""
    return med([a / b for a, b in zip(num, den) if b > 0])


def fmt(x, nd=1):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, int):
        return str(x)
    if x != x:  # nan
        return "-"
    return f"{x:,.{nd}f}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def write_json(path, obj):
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


def is_worker() -> bool:
    return "--worker" in sys.argv

"""PNG plots of run directories' metrics.jsonl (matplotlib, headless)."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def _series(recs: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in recs if key in r and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _panel(ax, recs, keys, title, ylabel=None, logy=False):
    for key in keys:
        x, y = _series(recs, key)
        if x:
            ax.plot(x, y, marker="o" if len(x) < 15 else None, markersize=3, label=key)
    ax.set_title(title)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def demo_plots(runs: Path, out: Path, stages: dict | None = None) -> list[Path]:
    """losses.png (pretrain / SFT / RM), rm_accuracy.png, ppo.png (reward, KL, length), grpo.png
    (when a GRPO run exists), stages.png (held-out exact-match, RM score, KL of SFT / PPO / GRPO
    from report.json's `stages`, when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    m = {k: read_metrics(runs / k) for k in ("pretrain", "sft", "rm", "ppo", "grpo")}
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    _panel(axes[0], m["pretrain"], ["loss", "eval_loss"], "pretraining", "cross entropy", logy=True)
    _panel(axes[1], m["sft"], ["loss", "eval_loss"], "SFT (LoRA)", "cross entropy (responses)", logy=True)
    _panel(axes[2], m["rm"], ["loss", "eval_loss"], "reward model", "pairwise loss")
    written.append(_save(plt, fig, out / "losses.png"))

    fig, ax = plt.subplots(figsize=(5, 3.8))
    _panel(ax, m["rm"], ["accuracy", "eval_accuracy"], "reward model accuracy", "accuracy")
    ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    written.append(_save(plt, fig, out / "rm_accuracy.png"))

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    _panel(axes[0], m["ppo"], ["score", "reward", "check_score"], "PPO reward (check_score: never trained on)",
           "per rollout")
    _panel(axes[1], m["ppo"], ["kl"], "PPO KL(policy || reference)", "nats / sequence")
    _panel(axes[2], m["ppo"], ["response_length"], "PPO response length", "tokens")
    written.append(_save(plt, fig, out / "ppo.png"))

    if m["grpo"]:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        _panel(axes[0], m["grpo"], ["score"], "GRPO reward (checker or RM score)", "per rollout")
        _panel(axes[1], m["grpo"], ["kl"], "GRPO KL(policy || reference)", "nats / sequence")
        _panel(axes[2], m["grpo"], ["equal_group_frac"], "GRPO groups with all-equal rewards", "fraction")
        written.append(_save(plt, fig, out / "grpo.png"))
    if stages:
        names = [k for k in ("sft", "ppo", "grpo") if k in stages and "exact_match" in stages[k]]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        for ax, key, title in zip(axes, ("exact_match", "rm_score", "kl"),
                                  ("held-out exact-match", "RM score of greedy answers", "KL to the SFT policy")):
            ax.bar(names, [stages[k].get(key) or 0.0 for k in names], color=["#777", "#c63", "#36c"][:len(names)])
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3, axis="y")
        written.append(_save(plt, fig, out / "stages.png"))
    return written

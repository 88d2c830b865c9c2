"""PPO raises the *true* reward of the verifiable toy task (configs/toy/ppo.yaml: answer with the
prompt's last token, then EOS) on one seed, measured by scripts/ppo_seeds.py's evaluation: greedy
and sampled decoding of the initial and final policies on the training prompts and on held-out
prompts.  (tests/test_ppo.py checks the exact KL-regularised optimum on an enumerable toy; this is
the end-to-end run of the stage as `llama-jax ppo` runs it, on the task's own reward.)"""
import importlib.util
import json
import math
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ppo_seeds():
    spec = importlib.util.spec_from_file_location("ppo_seeds", os.path.join(REPO, "scripts", "ppo_seeds.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # 60 iterations of 64 rollouts + evaluation: 2 min 10 s on the busy 2-core box
def test_ppo_raises_true_reward_on_the_copy_task(tmp_path):
    out = _ppo_seeds().main(["--seeds", "0", "--out", str(tmp_path / "runs"), "--samples", "32",
                             "mesh.fsdp=1"])  # one device (conftest fakes 8)
    r = out["seeds"][0]
    tr, held = r["train_prompts"], r["heldout"]
    # The run is sensitive to rounding (PPO amplifies it): the same seed starts from the same policy
    # but ends elsewhere under this conftest (8 fake CPU devices) than in a plain process.  Measured
    # for seed 0: train prompts greedy exact match 0 -> 0.375 here (0.75 in a plain process; 0.375-0.75
    # over the 6 runs of docs/ppo.md), greedy reward -0.75 -> 0.375, P(exact) under sampling
    # 0.004 -> 0.37; held-out greedy reward -0.97 -> 0.03 (learning to stop: a wrong answer + EOS
    # scores 0, no EOS -1), sampled -0.66 -> 0.03.
    assert tr["greedy_exact"]["init"] == 0.0 and tr["greedy_exact"]["final"] >= 0.25
    assert tr["greedy_reward"]["gain"] > 0.8 and tr["sampled_reward"]["gain"] > 0.8
    assert tr["sampled_exact_prob"]["final"] > max(0.2, 10 * tr["sampled_exact_prob"]["init"])
    assert held["greedy_reward"]["gain"] > 0.7 and held["sampled_reward"]["gain"] > 0.5
    assert math.isfinite(held["kl_final_init"]) and held["kl_final_init"] > 0
    assert r["train_log_last"]["eos_rate"] > 0.9
    saved = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert saved["seeds"]["0"]["train_prompts"]["greedy_exact"]["final"] == tr["greedy_exact"]["final"]

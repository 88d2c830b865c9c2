"""The demo's RL diagnostics with exact expected values (fast: generation and the RM are stubbed)."""
import numpy as np

from llama_jax import demo
from llama_jax.synthetic import Example


def test_rm_on_policy_samples_exact(monkeypatch):
    qs = [Example("number", f"把{n}写成汉字。", a, str(n)) for n, a in ((1, "一"), (2, "二"), (3, "三"))]
    # k = 3 samples (one list per seed) of the 3 questions, and the RM's score of each distinct reply
    samples = {0: ["一", "二", "四"], 1: ["七", "二", "五"], 2: ["一", "八", "六"]}
    by_reply = {("把1写成汉字。", "一"): 0.2, ("把1写成汉字。", "七"): 0.9, ("把2写成汉字。", "二"): 0.3,
                ("把2写成汉字。", "八"): 0.2, ("把3写成汉字。", "四"): 0.0, ("把3写成汉字。", "五"): 0.0,
                ("把3写成汉字。", "六"): 0.0}
    monkeypatch.setattr(demo, "answers", lambda model, tok, questions, temperature, seed: samples[seed])
    monkeypatch.setattr(demo, "rm_scores", lambda rm, tok, prompts, replies: np.asarray(
        [by_reply[(p, r)] for p, r in zip(prompts, replies)]))
    got = demo.rm_on_policy_samples(None, None, None, qs, k=3, seed=0)
    # right samples: q1 seeds 0, 2; q2 seeds 0, 1; q3 none -> 4 of 9; some sample right for q1, q2
    assert got["pass_at_1"] == round(4 / 9, 4) and got["pass_at_3"] == round(2 / 3, 4)
    # RM's favourite: q1 seed 1 (七, wrong), q2 seed 0 (二, right), q3 seed 0 (四, wrong; ties -> first)
    assert got["best_of_3_rm"] == round(1 / 3, 4)
    # right-over-wrong pairs: q1 一 (0.2) vs 七 (0.9) twice: no; q2 二 (0.3) vs 八 (0.2) twice: yes
    assert got["pairs"] == 4 and got["pairwise_accuracy"] == 0.5

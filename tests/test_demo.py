"""`llama-jax demo --size tiny`: every stage of the pipeline runs through the CLI on the built-in task.

The full-size demo's numbers (RM >= 90 %, PPO raising exact-match) take ~10 minutes and are
checked by `make demo` and recorded in docs/demo.md; here the tiny run checks what a few steps
already determine exactly: the files and their chaining, the tokenizer's compression on the
synthetic text, a report whose numbers come from the runs' metrics, plots, loadable exports.
"""
import json
import math
import struct

import pytest
import yaml

from llama_jax.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--size", "tiny"]) == 0
    return out, json.loads((out / "report.json").read_text())


def _recs(out, name):
    return [json.loads(x) for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def cfg_ppo_warmup(out):
    return yaml.safe_load((out / "configs" / "ppo.yaml").read_text())["ppo"]["critic_warmup"]


def test_report_and_stage_chaining(demo):
    out, rep = demo
    st = rep["stages"]
    assert set(st) == {"tokenizer", "pretrain", "sft", "rm", "ppo", "grpo"}
    # every RL and SFT stage reports held-out exact-match, the RM's score of its greedy answers and KL
    # (KL: GRPO's k3 estimate is >= 0 per token; PPO's k1 is unbiased but a batch mean can be < 0)
    for k in ("sft", "ppo", "grpo"):
        assert 0.0 <= st[k]["exact_match"] <= 1.0 and st[k]["rm_score"] is not None and math.isfinite(st[k]["kl"])
    assert st["sft"]["kl"] == 0.0 and st["grpo"]["kl"] >= 0.0
    # the colloquial habit of the SFT data, per stage, on the held-out questions that have such a form
    for k in ("sft", "ppo", "grpo"):
        c = st[k]["colloquial_questions"]
        assert c["questions"] > 0 and 0.0 <= c["colloquial"] + c["exact_match"] <= 1.0
    # the RM's view of the SFT model's own samples (what RL against it can gain)
    o = st["rm"]["on_sft_samples"]
    assert 0 <= o["pass_at_1"] <= o["pass_at_8"] <= 1 and o["best_of_8_rm"] <= o["pass_at_8"]
    assert st["rm"]["own_sample_pairs"] == sum(1 for _ in (out / "data" / "pref_train_samples.jsonl").open())
    # critic warmup: the first iteration left the policy alone (logged means over 2 iterations)
    pu = [r["policy_updated"] for r in _recs(out, "ppo") if "policy_updated" in r]
    assert cfg_ppo_warmup(out) == 1 and pu[0] < 1.0 and pu[-1] == 1.0
    assert st["ppo"]["exact_match_before"] == st["grpo"]["exact_match_before"] == st["sft"]["exact_match"]
    # each stage's metrics are the last ones its run logged
    for name, key, rkey in [("pretrain", "eval_ppl", "eval_ppl"), ("sft", "eval_loss", "eval_loss"),
                            ("rm", "eval_accuracy", "eval_accuracy"), ("ppo", "kl_last", "kl"), ("grpo", "kl", "kl"),
                            ("ppo", "check_score_last", "check_score")]:
        recs = [json.loads(x) for x in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert st[name][key] == [r[rkey] for r in recs if rkey in r][-1]
    # stages are chained through exported models, as their configs say
    cfg = {k: yaml.safe_load((out / "configs" / f"{k}.yaml").read_text())
           for k in ("pretrain", "sft", "rm", "ppo", "grpo")}
    assert cfg["sft"]["model"]["init"] == str(out / "models" / "pretrained")
    assert cfg["rm"]["model"]["init"] == cfg["ppo"]["model"]["init"] == cfg["grpo"]["model"]["init"] \
        == str(out / "models" / "sft")
    # PPO against the RM (critic from it too), the checker only monitored; GRPO on the checker
    assert cfg["ppo"]["ppo"]["reward_model"] == str(out / "models" / "rm") and st["ppo"]["reward"] == "rm"
    assert cfg["ppo"]["ppo"]["check_fn"] == cfg["grpo"]["grpo"]["reward_fn"] == "llama_jax.synthetic:exact_match_reward"
    assert cfg["ppo"]["ppo"]["adaptive_kl"] and cfg["ppo"]["ppo"]["score_clip"] > 0
    assert cfg["sft"]["lora"]["enabled"] and cfg["sft"]["lora"]["trainable_modules"] == ["embed_tokens", "lm_head"]
    for m in ("pretrained", "sft", "rm", "ppo", "grpo"):
        assert (out / "models" / m / "config.json").exists()
    # the RM export carries its normalisation offset, which PPO subtracted
    assert "reward_offset" in json.loads((out / "models" / "rm" / "config.json").read_text())
    # PPO started at the SFT policy: KL to the reference is reported and finite
    assert st["ppo"]["kl_last"] is not None and math.isfinite(st["ppo"]["kl_last"])
    assert 0.0 <= st["sft"]["exact_match"] <= 1.0 and st["sft"]["exact_match_before"] == 0.0
    assert len(rep["samples"]) == 4 * 4 and all("correct" in s for s in rep["samples"])


def test_tokenizer_stage_shortens_chinese(demo):
    out, rep = demo
    t = rep["stages"]["tokenizer"]
    assert t["base_kind"].startswith("trained on the fly")
    # the base falls back to bytes on Chinese (3 per character), the merged one has Chinese pieces
    assert t["chars_per_token_base"] < 0.5 and t["chars_per_token_merged"] > 1.2
    assert t["tokens_merged_over_base"] == round(t["eval_tokens_merged"] / t["eval_tokens_base"], 4)
    assert t["merged_vocab"] % 64 == 0 and t["pad_id"] == t["base_vocab"]
    assert (out / "tokenizer" / "merged" / "tokenizer.json").exists()


def test_plots_are_pngs(demo):
    out, rep = demo
    assert {p.split("/")[-1] for p in rep["plots"]} == {"losses.png", "rm_accuracy.png", "ppo.png", "grpo.png",
                                                         "stages.png"}
    for p in rep["plots"]:
        head = open(p, "rb").read(24)
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = struct.unpack(">II", head[16:24])
        assert w > 300 and h > 200


def test_bad_data_dir_is_named(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "missing")])
    assert rc != 0
    assert "missing" in capsys.readouterr().err


def test_ppo_on_the_reward_model_config(tmp_path):
    """--ppo-reward rm (the default with --data): PPO against the trained RM, critic from it too."""
    from llama_jax.demo import SIZES, DemoData, stage_configs

    data = DemoData(tokenizer_corpus=[], tokenizer_eval=[], pretrain_train=[tmp_path / "a.txt"], pretrain_eval=[],
                    sft_train=[tmp_path / "s.json"], sft_eval=[], pref_train=[tmp_path / "p.jsonl"], pref_eval=[],
                    ppo_prompts=[tmp_path / "q.jsonl"])
    tm = {"merged_vocab": 768, "pad_id": 562}
    c = stage_configs(tmp_path, data, tmp_path / "tok", tm, SIZES["tiny"], ppo_reward="rm")["ppo"]
    assert c["ppo"]["reward_model"] == str(tmp_path / "models" / "rm") and "reward_fn" not in c["ppo"]
    assert c["model"]["init"] == str(tmp_path / "models" / "sft") and c["lora"]["enabled"]
    assert "check_fn" not in c["ppo"] and c["ppo"]["adaptive_kl"]  # nothing to check answers with on real data
    assert "grpo" not in stage_configs(tmp_path, data, tmp_path / "tok", tm, SIZES["tiny"])  # GRPO needs the checker
    # no held-out files given: the stages hold out a fraction themselves
    cs = stage_configs(tmp_path, data, tmp_path / "tok", tm, SIZES["tiny"])
    assert cs["pretrain"]["data"]["eval_fraction"] == 0.05 and cs["rm"]["data"]["eval_fraction"] == 0.1

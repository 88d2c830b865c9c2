"""Typed run configs (train/config.py): every key typed and documented, errors that name the key and
the expected type, stage defaults that survive a YAML section, config.json round trips, and the
CLI's --print-config.  No model is built here (fast)."""
import json
import os

import pytest

from llama_jax.cli import main
from llama_jax.stages import dpo, grpo, ppo, pretrain, reward, sft
from llama_jax.train.config import ConfigError, RunConfig, Section, format_config, from_run_dict, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "configs", "toy")
STAGES = {"pretrain": pretrain.PretrainConfig, "sft": sft.SFTConfig, "dpo": dpo.DPOConfig, "rm": reward.RMConfig,
          "ppo": ppo.PPOConfig, "grpo": grpo.GRPOConfig}


@pytest.mark.parametrize("over, key, expected", [
    ("train.steps=ten", "train.steps", "int"),
    ("train.lr=fast", "train.lr", "float"),
    ("lora.enabled=maybe", "lora.enabled", "true or false"),
    ("data.max_length=[1]", "data.max_length", "int"),
    ("train.batch_size=1.5", "train.batch_size", "int"),
])
def test_a_wrong_type_names_the_key_and_the_type(over, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(sft.SFTConfig, os.path.join(TOY, "sft.yaml"), [over])
    msg = str(e.value)
    assert msg.startswith(f"{key}: expected {expected}") and "sft.yaml" in msg, msg


def test_unknown_keys_and_choices_are_named():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.stepz'"):
        load_config(sft.SFTConfig, None, ["train.stepz=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'ppo'"):
        load_config(sft.SFTConfig, None, ["ppo.clip=0.1"])
    with pytest.raises(ConfigError, match=r"data\.batching: 'rows' is not one of auto, pack, bucket, pad"):
        load_config(sft.SFTConfig, None, ["data.batching=rows"])
    with pytest.raises(ConfigError, match=r"model\.remat: 'some' is not one of"):
        load_config(sft.SFTConfig, None, ["model.remat=some"])
    with pytest.raises(ConfigError, match=r"ppo: give exactly one of ppo\.reward_model"):
        load_config(ppo.PPOConfig, None, [])
    with pytest.raises(ConfigError, match=r"needs lora\.enabled"):
        load_config(sft.SFTConfig, None, ["model.quantization=nf4"])


def test_values_are_converted_as_yaml_writes_them():
    c = load_config(sft.SFTConfig, None, ["train.lr=1e-5", "data.train_files=one.json", "train.steps=200.0",
                                          "model.overrides={vocab_size: 64}"])
    assert c.train.lr == 1e-5 and isinstance(c.train.lr, float)  # YAML 1.1 reads 1e-5 as a string
    assert c.data.train_files == ["one.json"] and c.train.steps == 200 and isinstance(c.train.steps, int)
    assert c.model.overrides == {"vocab_size": 64}


def test_a_stage_keeps_its_defaults_under_a_yaml_section():
    """A YAML `train:` section overrides the keys it names; the others keep the stage's defaults (the
    RL stages' lr 1e-5 / b2 0.999, the reward model's steps derived from data.epochs), not the generic
    TrainSection's."""
    c = load_config(ppo.PPOConfig, os.path.join(TOY, "ppo.yaml"), ["train.lr=0.5"])
    assert (c.train.batch_size, c.train.lr, c.train.b2, c.train.weight_decay) == (64, 0.5, 0.999, 0.0)
    c = load_config(ppo.PPOConfig, None, ["ppo.reward_fn=copy_last_token", "train.steps=3"])
    assert (c.train.batch_size, c.train.lr, c.train.steps) == (16, 1e-5, 3)
    r = load_config(reward.RMConfig, os.path.join(TOY, "rm.yaml"))
    assert r.train.steps is None and r.train.min_lr_ratio == 0.0 and r.train.eval_batches is None


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_config_json_round_trips_and_every_option_is_documented(stage):
    cls = STAGES[stage]
    c = load_config(cls, os.path.join(TOY, f"{stage}.yaml"))
    if c.train.steps is None:  # the reward model's run writes the steps it derived
        c = c.replace(train=c.train.replace(steps=24))
    d = json.loads(json.dumps(c.to_dict()))  # what a run directory's config.json holds
    assert from_run_dict(cls, d) == c
    assert from_run_dict(RunConfig, d, sections=True).model == c.model  # what export reads

    def undocumented(section: Section, where=""):
        out = []
        for f in section.options():
            if not f.metadata.get("doc"):
                out.append(where + f.name)
            v = getattr(section, f.name)
            if isinstance(v, Section):
                out += undocumented(v, where + f.name + ".")
        return out

    assert undocumented(c) == []
    text = format_config(c)
    assert all(f"{f.name}:" in text for f in c.train.options())


def test_print_config_shows_the_resolved_config(capsys, tmp_path):
    assert main(["sft", os.path.join(TOY, "sft.yaml"), "--print-config", "train.lr=2e-5", "--out",
                 str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "  lr: 2.0e-05  # peak learning rate" in out
    assert "  batching: pack  # pack: several conversations per row" in out and "[auto | pack | bucket | pad]" in out
    assert not (tmp_path / "run").exists()  # printed, not run


def test_cli_config_error_exits_2_and_writes_nothing(capsys, tmp_path):
    assert main(["dpo", os.path.join(TOY, "dpo.yaml"), "--out", str(tmp_path / "run"), "dpo.beta=big"]) == 2
    err = capsys.readouterr().err
    assert "llama-jax dpo: error: dpo.beta: expected float, got 'big'" in err
    assert not (tmp_path / "run").exists()


def test_a_bug_is_not_reported_as_a_user_error(monkeypatch):
    """KeyError (or any non-user exception) keeps its traceback: it is a bug, not bad input."""
    def boom(cfg, out=None):
        raise KeyError("a programming error")

    monkeypatch.setattr(sft, "run_config", boom)
    with pytest.raises(KeyError):
        main(["sft", os.path.join(TOY, "sft.yaml")])

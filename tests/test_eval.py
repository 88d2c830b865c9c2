"""`llama-jax eval` and the lm-eval adapter on real weights (SmolLM2-135M-Instruct).

- prompts: ours == lm-eval's own rendering of the local task YAMLs, whose prompt fields == the
  shipped ceval-valid / cmmlu task YAMLs;
- per-choice log-likelihoods of 40 CMMLU questions (0- and 5-shot) == transformers' (<= 1e-3);
- sliding-window perplexity of a text file == transformers with the same windows (<= 1e-4 rel.);
- lm-eval with model="llama_jax" and model="hf" on the same local task: identical predictions
  and accuracy, and `llama-jax eval`'s own predictions equal them too;
- bad input: missing column, answer outside A-D, empty subject, vocabulary without the choices.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from llama_jax.data.multiple_choice import CONTINUATIONS, FORMATS, load_subjects, prompt
from llama_jax.scoring import lm_measures, sliding_windows
from llama_jax.stages.evaluate import EvalConfig, mc_requests, run_eval

ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    import llama_jax
    from llama_jax.text import load_tokenizer

    return llama_jax.load(smollm2_dir), load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def hf_smol(smollm2_dir):
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


def _hf_choice_lls(hf, reqs):
    """lm-eval's HF computation for one question: it feeds (context + continuation)[:-1] and reads
    the continuation's log-probability at the last position; with one-token continuations that
    input is the context for all four choices, so one forward pass gives all four."""
    import torch

    ctx = reqs[0][0]
    assert all(r[0] == ctx and len(r[1]) == 1 for r in reqs)
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([ctx])).logits[0, -1].double(), -1)
    return [float(lp[r[1][0]]) for r in reqs]


# ----------------------------------------------------------------------------- the measures
def test_measures_and_windows():
    m = lm_measures(nll=math.log(2) * 30, tokens=10, chars=15)
    assert m["bpc"] == pytest.approx(2.0) and m["ppl"] == pytest.approx(8.0)
    # 10 tokens after a prefix, windows of 4 every 2: each of tokens 1..10 scored exactly once
    wins = sliding_windows(11, 4, 2)
    scored = [t for b, e, first in wins for t in range(first, e)]
    assert scored == list(range(1, 11))
    assert wins[0] == (0, 4, 1) and all(e - b <= 4 for b, e, _ in wins)
    assert wins == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8), (8, 11, 10)]  # HF's recipe: begin every 2
    # disjoint windows (stride == max_length) still score every token once
    wins = sliding_windows(11, 4, 4)
    assert [t for b, e, first in wins for t in range(first, e)] == list(range(1, 11))
    assert all(e - b <= 4 and b < first for b, e, first in wins)


# ----------------------------------------------------------------------------- prompts vs lm-eval
def test_prompts_equal_lm_eval(tmp_path, data_dir):
    from lm_eval.tasks import TaskManager, get_task_dict

    from llama_jax.lm_eval_adapter import write_local_tasks

    tasks_dir = write_local_tasks(tmp_path / "tasks", data_dir)
    shipped = Path(__import__("lm_eval").__file__).parent / "tasks"
    for ours, theirs, base in (("cmmlu_local_agronomy", "cmmlu/cmmlu_agronomy.yaml", "cmmlu/_default_template_yaml"),
                               ("ceval-valid_local_accountant", "ceval/ceval-valid_accountant.yaml",
                                "ceval/_default_ceval_yaml")):
        mine = yaml.safe_load((tasks_dir / f"{ours}.yaml").read_text())
        ref = {**yaml.safe_load((shipped / base).read_text()), **yaml.safe_load((shipped / theirs).read_text())}
        for k in ("description", "doc_to_text", "doc_to_choice", "doc_to_target", "fewshot_config", "output_type"):
            assert mine[k] == ref[k], (ours, k)
    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    for name, task, path, subject in (
            ("cmmlu_local_agronomy", "cmmlu", data_dir / "benchmarks/cmmlu", "agronomy"),
            ("ceval-valid_local_accountant", "ceval", data_dir / "benchmarks/ceval/ceval-exam.zip", "accountant")):
        t = get_task_dict([name], tm)[name]
        docs = list(t.eval_docs)[:3]
        for shots in (0, 5):
            subj = load_subjects(task, path, [subject], shots=shots, limit=3)[0]
            for doc, q in zip(docs, subj.questions):
                assert prompt(q, subj, FORMATS[task]) == t.fewshot_context(doc, shots), (name, shots)
                reqs = t.construct_requests(doc, t.fewshot_context(doc, shots))
                assert tuple(r.args[1] for r in reqs) == CONTINUATIONS
                assert t.doc_to_target(doc) == q.answer


# ----------------------------------------------------------------------------- parity with transformers
def _check_choice_lls(smol, hf_smol, data_dir, subjects, limit, shots, tmp_path):
    model, tok = smol
    cfg = EvalConfig(model="smollm2", tasks=["cmmlu"], subjects=subjects, limit=limit, shots=shots, batch_size=8,
                     progress=False, out=str(tmp_path / "r.json"))
    res = run_eval(cfg, model=model, tok=tok)["tasks"]["cmmlu"]
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["cmmlu"]["n"] == res["n"] == limit * len(subjects)
    for s in load_subjects("cmmlu", data_dir / "benchmarks/cmmlu", subjects, shots=shots, limit=limit):
        ours = np.array(res["subjects"][s.name]["loglikelihoods"])
        ref = np.array([_hf_choice_lls(hf_smol, mc_requests(tok, prompt(q, s, FORMATS["cmmlu"]), 10 ** 9, q.where))
                        for q in s.questions])
        np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
        np.testing.assert_array_equal(ours.argmax(1), ref.argmax(1))
        assert res["subjects"][s.name]["correct"] == int((ref.argmax(1) == [q.answer for q in s.questions]).sum())


def test_cmmlu_choice_loglikelihoods_equal_transformers(smol, hf_smol, data_dir, tmp_path):
    """40 CMMLU questions, zero-shot (short prompts keep the default suite quick)."""
    _check_choice_lls(smol, hf_smol, data_dir, ["anatomy", "arts", "elementary_commonsense", "sociology"], 10, 0,
                      tmp_path)


def test_cmmlu_shared_prefix_equals_transformers(smol, hf_smol, data_dir, tmp_path):
    """k-shot prompts of one subject share the description and the k examples: the scorer runs that
    prefix once into a KV cache and only each question's tail after it (scoring.prefix_groups);
    the log-likelihoods still equal transformers' full forward of every prompt."""
    from llama_jax.scoring import prefix_groups

    model, tok = smol
    (s,) = load_subjects("cmmlu", data_dir / "benchmarks/cmmlu", ["arts"], shots=2, limit=6)
    ctxs = [mc_requests(tok, prompt(q, s, FORMATS["cmmlu"]), 10 ** 9, q.where)[0][0] for q in s.questions]
    groups, loose = prefix_groups(ctxs, 64)
    assert len(groups) == 1 and not loose and groups[0][0] >= 64  # the shared path is taken
    _check_choice_lls(smol, hf_smol, data_dir, ["arts"], 6, 2, tmp_path)


def test_prefix_groups():
    from llama_jax.scoring import prefix_groups

    rows = [[1, 2, 3, 4, 5], [1, 2, 3, 9], [7, 8], [1, 2, 3, 4, 6, 7], [7, 8, 9]]
    assert prefix_groups(rows, 3) == ([(3, [0, 3, 1])], [2, 4])  # [7, 8] is a whole row: never a prefix
    assert prefix_groups(rows, 4) == ([(4, [0, 3])], [1, 2, 4])
    assert prefix_groups(rows, 1) == ([(3, [0, 3, 1]), (1, [2, 4])], [])


@pytest.mark.slow
def test_cmmlu_choice_loglikelihoods_equal_transformers_5shot(smol, hf_smol, data_dir, tmp_path):
    _check_choice_lls(smol, hf_smol, data_dir, ["agronomy", "arts"], 20, 5, tmp_path)


def test_perplexity_equals_transformers(smol, hf_smol, data_dir, tmp_path):
    import torch

    model, tok = smol
    text = (data_dir / "en-corpus/wiki_demo.txt").read_text()[:1200]
    f = tmp_path / "doc.txt"
    f.write_text(text)
    L, S = 64, 40
    res = run_eval(EvalConfig(model="smollm2", tasks=["ppl"], data=[str(f)], max_length=L, stride=S,
                              batch_size=4, progress=False), model=model, tok=tok)
    got = res["tasks"]["ppl"]["files"][str(f)]
    # HF's "perplexity of fixed-length models" recipe, on the same sequence (prefix token + text)
    ids = torch.tensor([[tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
                        + tok(text, add_special_tokens=False)["input_ids"]])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), S):
        end = min(begin + L, ids.size(1))
        trg_len = end - prev_end
        inp = ids[:, begin:end]
        labels = inp.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            logits = hf_smol(inp).logits.double()
        lp = torch.log_softmax(logits[0, :-1], -1)
        tgt = labels[0, 1:]
        keep = tgt != -100
        nll -= float(lp[keep.nonzero()[:, 0], tgt[keep]].sum())
        count += int(keep.sum())
        prev_end = end
        if end == ids.size(1):
            break
    assert got["tokens"] == count == ids.size(1) - 1
    assert got["nll"] == pytest.approx(nll, rel=1e-4)
    assert got["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert got["bpc"] == pytest.approx(nll / math.log(2) / len(text), rel=1e-4)
    assert got["chars"] == len(text)


# ----------------------------------------------------------------------------- lm-eval: llama_jax vs hf
def _lm_eval_preds(res, task):
    samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
    return [int(np.argmax([r[0] for r in s["filtered_resps"]])) for s in samples], res["results"][task]["acc,none"]


def _lm_eval_pair(smollm2_dir, smol, tmp_path, data_dir, task, limit, shots):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from llama_jax.lm_eval_adapter import write_local_tasks

    tm = TaskManager(include_path=str(write_local_tasks(tmp_path / "tasks", data_dir)))
    # the registered name with lm-eval's model_args string, as a user would call it
    ours = lm_eval.simple_evaluate(model="llama_jax", model_args=f"pretrained={smollm2_dir},batch_size=8",
                                   tasks=[task], num_fewshot=shots, limit=limit, task_manager=tm, log_samples=True)
    ref = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={smollm2_dir},device=cpu,dtype=float32",
                                  tasks=[task], num_fewshot=shots, limit=limit, task_manager=tm, log_samples=True)
    (p_ours, acc_ours), (p_ref, acc_ref) = _lm_eval_preds(ours, task), _lm_eval_preds(ref, task)
    assert p_ours == p_ref and acc_ours == acc_ref
    ll_ours = [[r[0] for r in s["filtered_resps"]] for s in sorted(ours["samples"][task], key=lambda s: s["doc_id"])]
    ll_ref = [[r[0] for r in s["filtered_resps"]] for s in sorted(ref["samples"][task], key=lambda s: s["doc_id"])]
    np.testing.assert_allclose(ll_ours, ll_ref, atol=1e-3)
    return p_ref, acc_ref


def test_lm_eval_llama_jax_equals_hf(smollm2_dir, smol, tmp_path, data_dir):
    import lm_eval.api.registry as reg

    import llama_jax.lm_eval_adapter  # noqa: F401  registers the name

    assert reg.get_model("llama_jax") is llama_jax.lm_eval_adapter.LlamaJaxLM
    preds, acc = _lm_eval_pair(smollm2_dir, smol, tmp_path, data_dir, "cmmlu_local_anatomy", limit=8, shots=0)
    # `llama-jax eval`'s own scoring gives the same predictions
    r = run_eval(EvalConfig(model="smollm2", tasks=["cmmlu"], subjects=["anatomy"], limit=8, progress=False),
                 model=smol[0], tok=smol[1])["tasks"]["cmmlu"]
    assert r["subjects"]["anatomy"]["predictions"] == preds and r["acc_micro"] == pytest.approx(acc)


@pytest.mark.slow
def test_lm_eval_llama_jax_equals_hf_ceval_5shot(smollm2_dir, smol, tmp_path, data_dir):
    _lm_eval_pair(smollm2_dir, smol, tmp_path, data_dir, "ceval-valid_local_accountant", limit=10, shots=5)


def test_lm_eval_rolling_and_generate(smollm2_dir, smol):
    from lm_eval.api.instance import Instance

    from llama_jax.lm_eval_adapter import LlamaJaxLM

    lm = LlamaJaxLM(pretrained=str(smollm2_dir), model=smol[0], max_length=16)
    text = "The quick brown fox jumps over the lazy dog. " * 3
    reqs = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    roll = lm.loglikelihood_rolling(reqs, disable_tqdm=True)[0]
    # == lm-eval's hf backend with the same max_length (rolling windows of 16 tokens)
    from lm_eval.models.huggingface import HFLM

    ref = HFLM(pretrained=str(smollm2_dir), device="cpu", dtype="float32", max_length=16)
    assert roll == pytest.approx(ref.loglikelihood_rolling(reqs, disable_tqdm=True)[0], abs=1e-3)
    out = lm.generate_until([Instance("generate_until", {}, ("The capital of France is",
                                                              {"until": ["."], "max_gen_toks": 8}), 0)],
                            disable_tqdm=True)
    assert out[0].startswith(" Paris") and "." not in out[0]
    # `llama-jax eval --lm-eval` runs through run_tasks (local task YAMLs written on the fly)
    from llama_jax.lm_eval_adapter import run_tasks

    lm.scorer.max_length = 2048
    res = run_tasks(model=str(smollm2_dir), tasks=["cmmlu_local_anatomy"], limit=2, shots=0, lm=lm)
    assert "cmmlu_local_anatomy" in res["results"] and "cmmlu_local_anatomy" in res["table"]


# ----------------------------------------------------------------------------- bad input
def _cli(args, capsys):
    from llama_jax.cli import main

    rc = main(["eval", *args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("content,needle", [
    (",Question,A,B,C,Answer\n0,q,a,b,c,A\n", "line 1: missing column(s) 'D'"),
    (",Question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n1,q2,a,b,c,d,E\n", "line 3: field 'Answer' is 'E'"),
    (",Question,A,B,C,D,Answer\n", "subject 'agronomy' has no questions"),
])
def test_bad_csv(tmp_path, capsys, smollm2_dir, content, needle):
    d = tmp_path / "cmmlu"
    (d / "test").mkdir(parents=True)
    f = d / "test" / "agronomy.csv"
    f.write_text(content)
    rc, err = _cli(["--model", str(smollm2_dir), "--tasks", "cmmlu", "--data", str(d), "--mesh", "fsdp=1"], capsys)
    assert rc == 2 and str(f) in err and needle in err, err
    assert "Traceback" not in err


def test_bad_mmlu_row_and_unknown_subject(tmp_path):
    from llama_jax.data.sources import DataError

    d = tmp_path / "mmlu" / "test"
    d.mkdir(parents=True)
    (d / "anatomy_test.csv").write_text("q1,a,b,c,d,A\nq2,a,b,c\n")
    with pytest.raises(DataError, match=r"anatomy_test.csv: line 2: 4 field\(s\), expected 6.*field 'D' is missing"):
        load_subjects("mmlu", tmp_path / "mmlu")
    with pytest.raises(DataError, match="no mmlu subject.*nutrition"):
        load_subjects("mmlu", tmp_path / "mmlu", ["nutrition"])
    with pytest.raises(DataError, match="5-shot needs the dev file dev/anatomy_dev.csv"):
        (d / "anatomy_test.csv").write_text("q1,a,b,c,d,A\n")
        load_subjects("mmlu", tmp_path / "mmlu", shots=5)


def test_vocab_without_choice_tokens(tmp_path, capsys, smollm2_dir, data_dir):
    """A model whose vocabulary is smaller than the tokenizer's ids for ' A'..' D'."""
    import llama_jax

    small = llama_jax.init_model(llama_jax.preset("toy", vocab_size=256, num_hidden_layers=1))
    d = llama_jax.save_hf(small, tmp_path / "small", tokenizer=smollm2_dir)
    rc, err = _cli(["--model", str(d), "--tasks", "cmmlu", "--subjects", "agronomy", "--limit", "2",
                    "--mesh", "fsdp=1"], capsys)
    assert rc == 2 and "agronomy.csv:2: the choice ' A' has no token in this model's vocabulary" in err, err
    assert "outside the model's vocabulary of 256" in err

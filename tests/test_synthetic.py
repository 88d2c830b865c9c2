"""The demo's built-in task: readings with exact expected values, seeded splits, corruptions."""
import random

import pytest

from llama_jax.synthetic import Example, SyntheticTask, answer_of, colloquial, date_to_zh, number_to_en, number_to_zh


@pytest.mark.parametrize("n, zh", [
    (0, "零"), (7, "七"), (10, "十"), (15, "十五"), (20, "二十"), (99, "九十九"), (100, "一百"), (101, "一百零一"),
    (110, "一百一十"), (115, "一百一十五"), (1000, "一千"), (1005, "一千零五"), (1010, "一千零一十"),
    (1100, "一千一百"), (2019, "二千零一十九"), (9999, "九千九百九十九"), (10000, "一万"), (10010, "一万零一十"),
    (15000, "一万五千"), (100000, "十万"), (105000, "十万五千"), (1000001, "一百万零一"),
    (12345678, "一千二百三十四万五千六百七十八"), (20300, "二万零三百"),
])
def test_number_to_zh(n, zh):
    assert number_to_zh(n) == zh


def test_number_to_zh_range():
    with pytest.raises(ValueError, match="outside"):
        number_to_zh(10 ** 8)


def test_date_and_english():
    assert date_to_zh(2023, 5, 12) == "二〇二三年五月十二日"
    assert date_to_zh(2000, 10, 1) == "二〇〇〇年十月一日"
    assert date_to_zh(1999, 12, 31) == "一九九九年十二月三十一日"
    assert number_to_en(4096) == "four thousand ninety-six"
    assert number_to_en(115) == "one hundred fifteen"


@pytest.mark.parametrize("standard, informal", [
    ("二〇二三年五月十二日", "二零二三年五月十二日"), ("二〇〇〇年十月一日", "二零零零年十月一日"),
    ("一九九九年十二月三十一日", "一九九九年十二月三十一日"),  # a year without 〇: unchanged
    ("二百", "两百"), ("二百一十五", "两百十五"), ("一百一十", "一百十"), ("三百一十九", "三百十九"),
    ("十五", "十五"), ("二十二", "二十二"), ("一百零一", "一百零一"), ("一千零一十", "一千零一十"), ("二", "二"),
])
def test_colloquial(standard, informal):
    assert colloquial(standard) == informal


def test_colloquial_share_counts_only_questions_with_a_colloquial_form():
    from llama_jax.demo import colloquial_share

    qs = [Example("number", "把115写成汉字。", "一百一十五", "115"), Example("number", "把30写成汉字。", "三十", "30"),
          Example("date", "把2001年1月1日写成汉字。", "二〇〇一年一月一日", "2001年1月1日"),
          Example("number", "把200写成汉字。", "二百", "200")]
    got = colloquial_share(qs, ["一百十五", "三十", "二〇〇一年一月一日", "二百零"])
    assert got == {"questions": 3, "colloquial": round(1 / 3, 4), "exact_match": round(1 / 3, 4)}
    assert colloquial_share(qs[1:2], ["三十"]) == {"questions": 0, "colloquial": None, "exact_match": None}


def test_demo_sft_data_colloquial_share(tmp_path):
    """The demo's SFT answers: the standard reading or its colloquial form, the latter at the configured
    rate where one exists; held-out SFT answers and every pair's chosen side stay standard."""
    import json

    from llama_jax.demo import Sizes, synthetic_data

    n = Sizes(corpus_lines=60, sft_examples=2000, pref_pairs=300, eval_pairs=200, ppo_prompts=8, eval_questions=8,
              rm_sample_questions=8, sft_colloquial=0.7)
    data = synthetic_data(tmp_path, SyntheticTask(), n)
    t = SyntheticTask()
    exs = t.examples(n.sft_examples, "train", n.seed)
    recs = [json.loads(x) for x in data.sft_train[0].read_text("utf-8").splitlines()]
    assert [r["instruction"] for r in recs] == [e.question for e in exs]
    has = [colloquial(e.answer) != e.answer for e in exs]
    informal = [r["output"] != e.answer for r, e in zip(recs, exs)]
    assert all(r["output"] in (e.answer, colloquial(e.answer)) for r, e in zip(recs, exs))
    share = sum(informal) / sum(has)
    assert 0.2 < sum(has) / len(exs) < 0.3 and 0.65 < share < 0.75, (sum(has), share)
    for f in (data.sft_eval[0], data.pref_train[0], data.pref_eval[0]):
        for r in map(json.loads, f.read_text("utf-8").splitlines()):
            want = r.get("output", r.get("chosen"))
            q = r.get("instruction", r.get("prompt"))
            assert want == answer_of(q), (f, r)
    kinds = [json.loads(x)["corruption"] for x in data.pref_eval[0].read_text("utf-8").splitlines()]
    assert "colloquial" in kinds
    # scripts rerunning a stage of a finished demo score on the same questions, sizes read back from its report
    from llama_jax.demo import finished_demo_sizes, held_out_questions

    assert data.eval_questions == held_out_questions(SyntheticTask(), n)
    with pytest.raises(ValueError, match="no report.json"):
        finished_demo_sizes(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"sizes": {**n.__dict__, "future_field": 1}}))
    assert finished_demo_sizes(tmp_path) == n
    (tmp_path / "report.json").write_text(json.dumps({"sizes": {**n.__dict__, "eval_questions": 0}}))
    with pytest.raises(ValueError, match="report.json: field 'sizes'"):
        finished_demo_sizes(tmp_path)


def test_splits_are_disjoint_and_seeded():
    t = SyntheticTask()
    train = t.examples(3000, "train", 0)
    test = t.examples(500, "test", 0)
    assert {e.digits for e in train}.isdisjoint({e.digits for e in test})
    assert t.examples(50, "test", 0) == test[:50]  # same seed, same stream
    assert t.examples(50, "test", 1) != test[:50]
    frac_dates = sum(e.kind == "date" for e in train) / len(train)
    assert 0.25 < frac_dates < 0.35
    for e in train[:200]:
        assert t.check(e, f" {e.answer} ")
        if e.kind == "number":
            assert e.question == f"把{e.digits}写成汉字。" and e.answer == number_to_zh(int(e.digits))


def test_corruptions_are_wrong():
    t = SyntheticTask()
    rng = random.Random(0)
    for e in t.examples(500, "train", 3):
        bad, kind = t.corrupt(e, rng)
        assert kind in t.CORRUPTIONS
        assert bad and bad != e.answer and not t.check(e, bad)


def test_corruption_weights():
    t = SyntheticTask()
    rng = random.Random(1)
    exs = t.examples(300, "train", 4)
    kinds = [t.corrupt(e, rng, {"numeral": 3.0, "digits": 1.0})[1] for e in exs]
    assert set(kinds) == {"numeral", "digits"} and 0.65 < kinds.count("numeral") / len(kinds) < 0.85
    # a kind that does not apply (no numeral other than 零 in "零") is redrawn, never returned wrong
    zero = Example("number", "把0写成汉字。", "零", "0")
    assert {t.corrupt(zero, rng, {"numeral": 1.0, "digits": 1.0})[1] for _ in range(20)} == {"digits"}
    with pytest.raises(ValueError, match="applies"):  # only kinds that cannot corrupt "零": no endless redraw
        t.corrupt(zero, rng, {"numeral": 1.0, "truncated": 1.0})
    # the colloquial kind exists only where the answer has a colloquial form
    e115 = Example("number", "把115写成汉字。", "一百一十五", "115")
    assert t.corrupt(e115, rng, {"colloquial": 1.0}) == ("一百十五", "colloquial")
    with pytest.raises(ValueError, match="applies"):
        t.corrupt(Example("number", "把30写成汉字。", "三十", "30"), rng, {"colloquial": 1.0})
    for bad in ({"typo": 1.0}, {"numeral": 0.0}, {"numeral": -1.0, "digits": 2.0}):
        with pytest.raises(ValueError, match="weights"):
            t.corrupt(exs[0], rng, bad)


def test_answer_credit():
    from llama_jax.synthetic import answer_credit

    assert answer_credit("九百六十五", "九百六十五", 0.5) == 1.0
    assert answer_credit("九百五十五", "九百六十五", 0.5) == 0.5 * 4 / 5    # one numeral off
    assert answer_credit("九百", "九百六十五", 0.5) == 0.5 * 2 / 5          # cut short
    assert answer_credit("九百六十五万", "九百六十五", 0.5) == 0.5 * 5 / 6  # too long
    assert answer_credit("九百五十五", "九百六十五", 0.0) == 0.0


def test_corpus_lines_hold_true_facts():
    t = SyntheticTask()
    line = t.corpus(1, "train", 0, facts_per_line=3)[0]
    facts = [f for f in line.split("。") if f]
    assert len(facts) == 3
    for f in facts:
        for sep in ("的汉字写法是", "用汉字写是", "写作", "读作"):
            if sep in f:
                digits, zh = f.split(sep)
                break
        if "年" in digits:
            y, rest = digits.split("年")
            m, d = rest.rstrip("日").split("月")
            assert zh == date_to_zh(int(y), int(m), int(d))
        else:
            assert zh == number_to_zh(int(digits))


def test_answer_of_and_checker_reward(data_dir):
    import numpy as np

    from llama_jax.synthetic import answer_of, exact_match_reward
    from llama_jax.text import load_tokenizer

    assert answer_of("[INST] 把72写成汉字。 [/INST]") == "七十二"
    assert answer_of("把2023年5月12日写成汉字。") == "二〇二三年五月十二日"
    assert answer_of("把2023年13月12日写成汉字。") is None and answer_of("你好") is None
    path = data_dir / "llama2-tokenizer" / "tokenizer.model"
    tok = load_tokenizer(path)
    reward = exact_match_reward(str(path))
    prompt = tok("[INST] 把72写成汉字。 [/INST]")["input_ids"]
    replies = ["七十二", "七十三", " 七十二 "]
    resp = [tok.sp.encode(r) + [tok.eos_token_id] for r in replies]
    N = max(map(len, resp))
    ids = np.zeros((3, N), np.int32)
    mask = np.zeros((3, N), np.float32)
    for i, r in enumerate(resp):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    got = reward(np.asarray([prompt] * 3), ids, mask)
    assert got.dtype == np.float32 and got.tolist() == [1.0, 0.0, 1.0]
    graded = exact_match_reward(str(path), partial=0.5)(np.asarray([prompt] * 3), ids, mask)
    np.testing.assert_allclose(graded, [1.0, 0.5 * 2 / 3, 1.0], rtol=1e-6)  # 七十三: 2 of 3 in place
    with pytest.raises(ValueError, match="partial"):
        exact_match_reward(str(path), partial=1.0)

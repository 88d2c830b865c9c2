"""`llama-jax data clean` on a fixture with planted bad records: precision and recall of the planted
removals >= 0.95 each, nothing else removed, repairs exact, output deterministic; rules switch off."""
import json
import os
import random
import subprocess
import sys

import pytest

from llama_jax.data.clean import CleanConfig, clean

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFUSALS = ["作为一个AI语言模型，我无法对此发表个人看法。", "很抱歉，我无法提供这方面的信息。",
            "As an AI language model, I cannot browse the internet.", "我无法回答这个问题，因为它涉及敏感内容。"]


def _edit(text, frac, rng):
    """Edit `frac` of the characters at random places (substitute / insert / delete one CJK character)."""
    t = list(text)
    for _ in range(max(1, int(len(t) * frac))):
        i = rng.randrange(len(t))
        op = rng.choice("sid")
        if op == "s":
            t[i] = chr(rng.randrange(0x4E00, 0x9FA5))
        elif op == "i":
            t.insert(i, chr(rng.randrange(0x4E00, 0x9FA5)))
        elif len(t) > 2:
            del t[i]
    return "".join(t)


def _widen(text):
    """The same text after normalisation: ASCII punctuation to full width, doubled spaces."""
    return text.replace(",", "，").replace("?", "？").replace(" ", "  ") + " "


@pytest.fixture(scope="module")
def fixture(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("clean")
    allrecs = json.loads((data_dir / "zh-sft" / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    recs, fresh = allrecs[:400], allrecs[400:420]  # fresh: for the repairs (not near-duplicates of the base)
    # the base: records the cleaner keeps on their own (so any later removal is due to what we plant)
    base_in = tmp / "base_in.json"
    base_in.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    clean([str(base_in)], tmp / "base_out", CleanConfig(progress=False))
    base = json.loads((tmp / "base_out" / "base_in.json").read_text(encoding="utf-8"))
    assert len(base) > 300
    rng = random.Random(0)
    out = [(r, "base") for r in base]
    src = rng.sample(base, 110)
    for r in src[:25]:
        out.append(({k: _widen(v) if k == "output" else v for k, v in r.items()}, "exact_dup"))
    for r in src[25:65]:
        frac = rng.uniform(0.01, 0.10)
        out.append(({**r, "instruction": _edit(r["instruction"], frac, rng), "output": _edit(r["output"], frac, rng)},
                    "near_dup"))
    for i, r in enumerate(src[65:80]):
        out.append(({**r, "instruction": r["instruction"] + f"（第{i}题）", "output": ["", "  ", "\n"][i % 3]},
                    "empty_response"))
    for i, r in enumerate(src[80:100]):
        out.append(({**r, "instruction": r["instruction"] + f"（问{i}）", "output": REFUSALS[i % 4]}, "refusal"))
    for i, r in enumerate(src[100:110]):  # unrepairable: bytes lost to U+FFFD
        bad = r["output"].encode("utf-8")[:-7].decode("utf-8", errors="replace") + "\ufffd\ufffd"
        out.append(({**r, "instruction": r["instruction"] + f"（{i}）", "output": bad}, "broken_text"))
    repaired = []
    for i, r in enumerate(fresh[:12]):  # repairable mojibake (UTF-8 read as windows-1252): kept, fixed
        import ftfy.bad_codecs  # noqa: F401  (registers sloppy-windows-1252)

        good = {**r, "instruction": r["instruction"] + f"（修复{i}）"}
        moj = {k: v.encode("utf-8").decode("sloppy-windows-1252") if k == "output" else v for k, v in good.items()}
        out.append((moj, "repaired"))
        repaired.append(good)
    for i, r in enumerate(fresh[12:20]):  # control characters: kept, stripped
        good = {**r, "instruction": r["instruction"] + f"（控制{i}）"}
        out.append(({**good, "output": "\x00" + good["output"][:5] + "\x07" + good["output"][5:]}, "control"))
        repaired.append(good)
    # originals first, then the plants in a seeded shuffle (the first of a duplicate group is kept)
    plants = [x for x in out if x[1] != "base"]
    rng.shuffle(plants)
    items = [x for x in out if x[1] == "base"] + plants
    path = tmp / "sft.json"
    path.write_text(json.dumps([r for r, _ in items], ensure_ascii=False, indent=1), encoding="utf-8")
    return tmp, path, items, repaired


def test_planted_removals_precision_recall(fixture):
    tmp, path, items, repaired = fixture
    rep = clean([str(path)], tmp / "out", CleanConfig(progress=False))
    kept = json.loads((tmp / "out" / "sft.json").read_text(encoding="utf-8"))
    kept_keys = {json.dumps(r, ensure_ascii=False, sort_keys=True) for r in kept}
    planted = {"exact_dup", "near_dup", "empty_response", "refusal", "broken_text"}
    fixed_keys = {json.dumps(r, ensure_ascii=False, sort_keys=True) for r in repaired}
    removed_planted = kept_planted = 0
    per = {}
    for r, t in items:
        if t in ("repaired", "control"):
            continue
        key = json.dumps(r, ensure_ascii=False, sort_keys=True)
        gone = key not in kept_keys
        if t in planted:
            removed_planted += gone
            kept_planted += not gone
            per.setdefault(t, [0, 0])[0 if gone else 1] += 1
        else:
            assert not gone, f"a base record was removed: {r['instruction'][:40]}"
    n_removed = rep["records_in"] - rep["records_out"]
    recall = removed_planted / (removed_planted + kept_planted)
    precision = removed_planted / n_removed
    print(f"recall {recall:.3f} precision {precision:.3f} per type (removed, kept): {per}; "
          f"removed by rule {rep['removed']}")
    assert recall >= 0.95 and precision >= 0.95, (recall, precision, per)
    assert all(k >= 0.9 * (k + m) for k, m in per.values()), per
    # repairs: the mojibake and control-character records come out exactly as the originals
    assert fixed_keys <= kept_keys
    assert rep["modified"]["mojibake_fixed"] >= 12 and rep["modified"]["control_chars"] == 8
    # counted per rule, with examples
    assert rep["removed"]["refusal"] >= 19 and rep["removed"]["broken_text"] == 10
    assert rep["examples"]["refusal"][0]["file"] == "sft.json"
    # deterministic: a second run writes the same bytes
    clean([str(path)], tmp / "out2", CleanConfig(progress=False))
    assert (tmp / "out" / "sft.json").read_bytes() == (tmp / "out2" / "sft.json").read_bytes()


def test_rules_switch_off_and_cli(fixture, tmp_path):
    tmp, path, items, _ = fixture
    r = subprocess.run([sys.executable, "-m", "llama_jax.cli", "data", "clean", str(path), "--out", str(tmp_path),
                        "--disable", "near_dup", "--disable", "refusal", "--min-response-chars", "0", "--no-progress",
                        "--report", str(tmp_path / "r.json")],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "exact_dup" in r.stdout and "records/s" in r.stdout
    rep = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert rep["removed"]["near_dup"] == rep["removed"]["refusal"] == rep["removed"]["empty_response"] == 0
    assert rep["enabled"]["near_dup"] is False and rep["removed"]["exact_dup"] >= 25
    # keep="longest": of two records with one prompt, the longer response stays, wherever it is
    f = tmp_path / "two.jsonl"
    f.write_text('{"instruction": "你好", "input": "", "output": "你好。"}\n'
                 '{"instruction": "你好", "input": "", "output": "你好！很高兴见到你。"}\n', encoding="utf-8")
    clean([str(f)], tmp_path / "longest", CleanConfig(keep="longest", progress=False))
    kept = [json.loads(l) for l in (tmp_path / "longest" / "two.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [k["output"] for k in kept] == ["你好！很高兴见到你。"]


def test_text_and_sharegpt_options(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("漢字轉換測試，這是一段繁體中文。聯絡 someone@example.com 或 13812345678。\n"
                 "哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈哈\n"
                 "This line is English only and has no Chinese characters at all.\n", encoding="utf-8")
    rep = clean([str(t)], tmp_path / "o", CleanConfig(to_simplified=True, mask_pii=True, lang="zh", progress=False))
    lines = (tmp_path / "o" / "a.txt").read_text(encoding="utf-8").splitlines()
    assert lines == ["汉字转换测试，这是一段繁体中文。联络 [EMAIL] 或 [PHONE]。"]
    assert rep["removed"]["repetition"] == 1 and rep["removed"]["language"] == 1
    s = tmp_path / "s.jsonl"
    s.write_text(json.dumps({"conversations": [{"from": "human", "value": "写一首诗"},
                                               {"from": "gpt", "value": "作为一个AI语言模型，我不会写诗。"}]},
                            ensure_ascii=False) + "\n" + "not json\n", encoding="utf-8")
    rep = clean([str(s)], tmp_path / "o2", CleanConfig(progress=False))
    assert rep["inputs"][str(s)]["format"] == "sharegpt"
    assert rep["removed"]["refusal"] == 1 and rep["removed"]["invalid_record"] == 1
    assert "line 2" in rep["examples"]["invalid_record"][0]["where"]

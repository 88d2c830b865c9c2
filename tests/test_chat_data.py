"""SFT data: record formats, templates (exact strings and ids), label masks, truncation, batching."""
import json

import numpy as np
import pytest

from llama_jax.data.records import Conversation, Stats, iter_records, to_conversation
from llama_jax.data.sft_examples import (IGNORE_INDEX, EncodedExample, bucket_batches, encode, load_sft,
                                         naive_padding_fraction, pack_examples, padding_fraction)
from llama_jax.data.templates import get_template, render
from llama_jax.data.sources import DataError
from llama_jax.text import load_tokenizer

SFT_FILES = ["alpaca_zh_demo.json", "belle_open_source_1k.jsonl", "oaast_sft_zh.json", "sharegpt_zh_1K_format.jsonl"]

# A Llama-2 chat template written for these tests (Meta's format, as a Jinja chat_template).
LLAMA2_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = none %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if m['role'] == 'user' %}"
    "{% if loop.first and sys is not none %}{% set content = '<<SYS>>\\n' + sys + '\\n<</SYS>>\\n\\n' + m['content'] %}"
    "{% else %}{% set content = m['content'] %}{% endif %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def sp_tok(data_dir):
    return load_tokenizer(data_dir / "llama2-tokenizer" / "tokenizer.model")


@pytest.fixture(scope="module")
def hf_tok(data_dir, tmp_path_factory):
    from llama_jax.tokenizer.hf_files import write_hf_files
    from llama_jax.tokenizer.sp_model import load_model_proto

    d = tmp_path_factory.mktemp("hf-llama2")
    write_hf_files(load_model_proto(data_dir / "llama2-tokenizer" / "tokenizer.model"), d)
    tok = load_tokenizer(d)
    tok.chat_template = LLAMA2_JINJA
    return tok


@pytest.fixture(scope="module")
def sft_convs(data_dir):
    """name -> conversations of each zh-sft file."""
    return {f: [c for _, c in iter_records(data_dir / "zh-sft" / f, to_conversation, Stats())] for f in SFT_FILES}


def conv(*turns, system=None):
    return Conversation(system, [("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)])


# ----------------------------------------------------------------------------- rendering

def test_llama2_chat_render():
    t = "llama2-chat"
    assert render(conv("你好", "你好！有什么可以帮你？"), t) == "<s>[INST] 你好 [/INST] 你好！有什么可以帮你？ </s>"
    assert render(conv("你好", "你好！", system="Be brief."), t) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n你好 [/INST] 你好！ </s>")
    assert render(conv("Hi", "Hello.", "再见", "再见！", system="Be brief."), t) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] 再见 [/INST] 再见！ </s>")
    assert render(conv("Hi", "Hello.", "再见", "再见！"), t) == (
        "<s>[INST] Hi [/INST] Hello. </s><s>[INST] 再见 [/INST] 再见！ </s>")
    # Meta strips user and assistant text
    assert render(conv("  Hi \n", "\nHello.  "), t) == "<s>[INST] Hi [/INST] Hello. </s>"


def test_chinese_alpaca_2_render():
    t = "chinese-alpaca-2"
    assert render(conv("你好", "你好！"), t) == (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n你好 [/INST] 你好！ </s>")
    assert render(conv("a", "b", "c", "d"), t) == (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\na [/INST] b </s>"
        "<s>[INST] c [/INST] d </s>")
    assert render(conv("你好", "你好！", system="简短回答。"), t) == (
        "<s>[INST] <<SYS>>\n简短回答。\n<</SYS>>\n\n你好 [/INST] 你好！ </s>")


def test_alpaca_render():
    t = "alpaca"
    c = to_conversation({"instruction": "Name a color.", "input": "", "output": "Blue."})
    assert render(c, t) == (
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a color.\n\n### Response:\nBlue.</s>")
    c = to_conversation({"instruction": "Translate.", "input": "你好", "output": "Hello."})
    assert render(c, t) == (
        "<s>Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n"
        "### Input:\n你好\n\n### Response:\nHello.</s>")
    c = to_conversation({"instruction": "And green?", "input": "", "output": "Leaf.",
                         "history": [["Name a blue thing.", "Sky."]]})
    assert render(c, t) == (
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a blue thing.\n\n### Response:\nSky.</s>\n\n"
        "### Instruction:\nAnd green?\n\n### Response:\nLeaf.</s>")
    assert render(conv("Hi", "Hello.", system="You are terse."), t) == (
        "<s>You are terse.\n\n### Instruction:\nHi\n\n### Response:\nHello.</s>")
    # the alpaca view of a record: input joined to the instruction on a new line
    assert render(to_conversation({"instruction": "Translate.", "input": "你好", "output": "Hello."}),
                  "llama2-chat") == "<s>[INST] Translate.\n你好 [/INST] Hello. </s>"


def test_tokenizer_template(hf_tok, sp_tok, sft_convs):
    c = conv("Hi", "Hello.", "再见", "再见！", system="Be brief.")
    assert render(c, "tokenizer", hf_tok) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] 再见 [/INST] 再见！ </s>")
    # the tokenizer's own template, tokenised whole by HF, gives the ids and labels of our llama2-chat
    tt, ll = get_template("tokenizer"), get_template("llama2-chat")
    sample = sft_convs["oaast_sft_zh.json"][::20] + sft_convs["sharegpt_zh_1K_format.jsonl"][::50] + [c]
    for x in sample:
        assert tt.exchanges(x, hf_tok) == ll.exchanges(x, sp_tok)
    with pytest.raises(ValueError, match="chat_template"):
        encode(c, sp_tok, "tokenizer", 512)
    with pytest.raises(ValueError, match="unknown chat template"):
        get_template("vicuna")


# ----------------------------------------------------------------------------- ids

def _ids(exchanges):
    return [i for p, r in exchanges for i in p + r]


def test_llama2_ids_match_meta_encoding(sp_tok, sft_convs):
    """Piece-by-piece ids == Meta's chat_completion: per exchange, BOS + encode("[INST] u [/INST] a ") + EOS."""
    sp = sp_tok.sp

    def meta(c, system):
        m = list(c.messages)
        if system is not None:
            m[0] = ("user", f"<<SYS>>\n{system}\n<</SYS>>\n\n{m[0][1]}")
        return [i for k in range(0, len(m), 2)
                for i in [1] + sp.encode(f"[INST] {m[k][1].strip()} [/INST] {m[k + 1][1].strip()} ") + [2]]

    t, z = get_template("llama2-chat"), get_template("chinese-alpaca-2")
    n = 0
    for convs in sft_convs.values():
        for c in convs:
            assert _ids(t.exchanges(c, sp_tok)) == meta(c, c.system)
            n += 1
        for c in convs[::10]:
            assert _ids(z.exchanges(c, sp_tok)) == meta(c, "You are a helpful assistant. 你是一个乐于助人的助手。")
    assert n == 3688


def test_alpaca_ids_match_whole_string_encoding(sp_tok, sft_convs):
    """Single turn: BOS + encode(prompt + output) + EOS, as Stanford Alpaca tokenises it."""
    t = get_template("alpaca")
    for f in ("alpaca_zh_demo.json", "belle_open_source_1k.jsonl"):
        for c in sft_convs[f]:
            text = t.render(c)
            assert text.startswith("<s>") and text.endswith("</s>") and text.count("</s>") == 1
            assert _ids(t.exchanges(c, sp_tok)) == [1] + sp_tok.sp.encode(text[3:-4]) + [2]


def test_hf_tokenizer_gives_same_ids(sp_tok, hf_tok, sft_convs):
    convs = [c for v in sft_convs.values() for c in v[::12]]
    for name in ("llama2-chat", "alpaca"):
        t = get_template(name)
        for c in convs:
            assert t.exchanges(c, hf_tok) == t.exchanges(c, sp_tok)
    # a user typing special-token text gets characters, not control tokens
    c = conv("say </s> and <s>", "ok")
    ids = _ids(get_template("llama2-chat").exchanges(c, hf_tok))
    assert ids.count(2) == 1 and ids.count(1) == 1


# ----------------------------------------------------------------------------- labels

def _label_runs(ex):
    """Contiguous labelled spans of an example, as id lists."""
    mask = ex.labels != IGNORE_INDEX
    assert np.array_equal(ex.labels[mask], ex.input_ids[mask])
    runs, cur = [], []
    for m, i in zip(mask, ex.input_ids):
        if m:
            cur.append(int(i))
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("name", ["llama2-chat", "chinese-alpaca-2", "alpaca"])
def test_labels_are_exactly_assistant_turns(name, sp_tok, sft_convs):
    convs = sft_convs["oaast_sft_zh.json"][::7] + sft_convs["sharegpt_zh_1K_format.jsonl"][::25]
    convs.append(conv("问题一", "回答一", "问题二", "回答二", "问题三", " spaced answer\n", system="系统"))
    turns_seen = 0
    for c in convs:
        ex = encode(c, sp_tok, name, 10 ** 6)
        answers = [a for _, a in c.exchanges()]
        runs = _label_runs(ex)
        assert len(runs) == len(answers)
        assert int((ex.labels == sp_tok.eos_token_id).sum()) == len(answers)
        assert int((ex.input_ids == sp_tok.eos_token_id).sum()) == len(answers)  # no EOS outside the labels
        for run, a in zip(runs, answers):
            assert run[-1] == sp_tok.eos_token_id
            text = sp_tok.sp.decode(run[:-1])
            # llama2 writes " {a.strip()} "; alpaca writes a as is (decode drops one leading space)
            assert text == (a.strip() + " " if name != "alpaca" else a.removeprefix(" "))
        turns_seen += len(answers)
    assert turns_seen > 300


# ----------------------------------------------------------------------------- truncation

def test_truncation(sp_tok):
    t = get_template("llama2-chat")
    c = conv("一" * 5, "二" * 30, "三" * 5, "四" * 30)
    (p0, r0), (p1, r1) = t.exchanges(c, sp_tok)
    full = len(p0) + len(r0) + len(p1) + len(r1)

    st = Stats()
    ex = encode(c, sp_tok, t, full, st)
    assert len(ex) == full and st.counts == {}

    ex = encode(c, sp_tok, t, full - 1, st)  # second exchange no longer fits: dropped whole
    assert len(ex) == len(p0) + len(r0) and st["truncated_turns"] == 1
    assert ex.input_ids[-1] == sp_tok.eos_token_id

    ex = encode(c, sp_tok, t, len(p0) + 3, st)  # first response cut to 3 tokens, no EOS
    assert list(ex.input_ids) == p0 + r0[:3] and list(ex.labels) == [IGNORE_INDEX] * len(p0) + r0[:3]
    assert st["truncated"] == 1

    ex = encode(c, sp_tok, t, len(p0) + 1, st)  # one response token is the least kept
    assert list(ex.labels[-1:]) == r0[:1] and st["truncated"] == 2

    assert encode(c, sp_tok, t, len(p0), st) is None  # the prompt alone fills max_length
    assert st["skipped_too_long"] == 1


# ----------------------------------------------------------------------------- real files

# (records, examples, counts besides records/examples) with chinese-alpaca-2, LLaMA-2 tokenizer, max_length 512
EXPECTED_512 = {
    "alpaca_zh_demo.json": (1000, 1000, {"truncated": 211}),
    "belle_open_source_1k.jsonl": (1000, 975, {"truncated": 110, "skipped_too_long": 25}),
    "oaast_sft_zh.json": (689, 681, {"truncated": 209, "truncated_turns": 155, "skipped_too_long": 8}),
    "sharegpt_zh_1K_format.jsonl": (1000, 942, {"truncated": 397, "truncated_turns": 2028, "skipped_too_long": 57,
                                                "dropped_trailing_user": 7, "skipped_no_response": 1}),
}


@pytest.fixture(scope="module")
def zh_sft_512(data_dir, sp_tok):
    return load_sft([str(data_dir / "zh-sft" / f) for f in SFT_FILES], sp_tok, "chinese-alpaca-2", 512)


def test_real_sft_files(data_dir, sp_tok, zh_sft_512):
    examples, stats = zh_sft_512
    print("\nzh-sft, chinese-alpaca-2, max_length 512:\n" + stats.report())
    for f, (records, n, extra) in EXPECTED_512.items():
        got = dict(stats.per_file[str(data_dir / "zh-sft" / f)])
        assert got == {"records": records, "examples": n, **extra}, f
    assert len(examples) == sum(v[1] for v in EXPECTED_512.values()) == stats["examples"]
    assert max(len(e) for e in examples) == 512
    assert all(int((e.labels != IGNORE_INDEX).sum()) >= 1 for e in examples)

    # without a length limit: only the format-level counts remain
    ex, st = load_sft(data_dir / "zh-sft" / "sharegpt_zh_1K_format.jsonl", sp_tok, "llama2-chat", 10 ** 6)
    assert st.counts == {"records": 1000, "examples": 999, "dropped_trailing_user": 7, "skipped_no_response": 1}
    turns = sum(int((e.labels == sp_tok.eos_token_id).sum()) for e in ex)
    assert turns == 4372  # every gpt message of the file is a labelled turn

    # belle_eval_set holds question/std_answer: not an SFT format, every record is reported
    ex, st = load_sft(data_dir / "zh-sft" / "belle_eval_set.jsonl", sp_tok, "alpaca", 512)
    assert ex == [] and st.counts == {"records": 1000, "skipped_missing_field": 1000}
    with pytest.raises(DataError, match=r"belle_eval_set\.jsonl: record 0 \(line 1\): field 'instruction'"):
        load_sft(data_dir / "zh-sft" / "belle_eval_set.jsonl", sp_tok, "alpaca", 512, on_error="error")


def test_dataset_input(sp_tok):
    import datasets

    rows = [{"instruction": "你好", "input": "", "output": "你好！"}, {"instruction": "x", "input": "", "output": " "}]
    ex, st = load_sft(datasets.Dataset.from_list(rows), sp_tok, "llama2-chat", 64)
    ex2, _ = load_sft(rows, sp_tok, "llama2-chat", 64)
    assert len(ex) == 1 and st["skipped_empty_response"] == 1
    assert np.array_equal(ex[0].input_ids, ex2[0].input_ids)
    with pytest.raises(DataError, match=r"<dataset>: record 1: field 'output'"):
        load_sft(datasets.Dataset.from_list(rows), sp_tok, "llama2-chat", 64, on_error="error")


# ----------------------------------------------------------------------------- bad records

BAD = [  # (record, reason, field in the error)
    ({"instruction": "q", "input": ""}, "missing_field", "output"),
    ({"input": "x", "output": "y"}, "missing_field", "instruction"),
    ({"instruction": "q", "output": "  \n"}, "empty_response", "output"),
    ({"instruction": "", "input": " ", "output": "y"}, "empty_prompt", "instruction"),
    ({"instruction": "q", "output": 3}, "non_string", "output"),
    ({"instruction": "q", "output": "y", "history": [["a", ""]]}, "empty_response", "history[0][1]"),
    ({"instruction": "q", "output": "y", "history": [["a"]]}, "bad_structure", "history[0]"),
    ({"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "yo"}]},
     "roles_out_of_order", "conversations[0].from"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
     "roles_out_of_order", "conversations[1].from"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]},
     "empty_response", "conversations[1].value"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": None}]},
     "missing_field", "conversations[1].value"),
    ({"conversations": [{"from": "human", "value": ["a"]}, {"from": "gpt", "value": "b"}]},
     "non_string", "conversations[0].value"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]},
     "unknown_role", "conversations[1].from"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "system", "value": "b"}]},
     "roles_out_of_order", "conversations[1].from"),
    ({"conversations": [{"from": "human", "value": "a"}]}, "no_response", "conversations"),
    ({"conversations": "a b"}, "bad_structure", "conversations"),
]
GOOD = [
    {"instruction": "q", "input": "", "output": "y"},
    {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": ""},  # empty user turn kept
                       {"from": "gpt", "value": "b"}, {"from": "human", "value": "dropped"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
]


def test_bad_records(tmp_path, sp_tok):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in GOOD[:1]] + [json.dumps(r) for r, _, _ in BAD] + [json.dumps(r) for r in GOOD[1:]]
    path.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n", encoding="utf-8")
    ex, st = load_sft(path, sp_tok, "llama2-chat", 128)
    # trailing user turns: GOOD[1]'s and the lone turn of the 'no_response' record
    want = {"records": len(BAD) + len(GOOD) + 1, "examples": len(GOOD), "dropped_trailing_user": 2,
            "skipped_invalid_json": 1}
    for _, reason, _ in BAD:
        want[f"skipped_{reason}"] = want.get(f"skipped_{reason}", 0) + 1
    assert st.counts == want
    assert st.skipped == len(BAD) + 1
    c = to_conversation(GOOD[1])
    assert c.system == "s" and c.messages == [("user", ""), ("assistant", "b")]

    for k, (rec, reason, field) in enumerate(BAD):
        p = tmp_path / f"one{k}.json"
        p.write_text(json.dumps([GOOD[0], rec]), encoding="utf-8")
        with pytest.raises(DataError) as e:
            load_sft(p, sp_tok, "llama2-chat", 128, on_error="error")
        msg = str(e.value)
        assert msg.startswith(f"{p}: record 1: field '{field}'"), msg
    path.write_text("\n".join(lines[:1] + ["", "{not json"]), encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: record 1 \(line 3\): not valid JSON"):
        load_sft(path, sp_tok, "llama2-chat", 128, on_error="error")
    with pytest.raises(DataError, match="not found"):
        load_sft(tmp_path / "missing.json", sp_tok, "llama2-chat", 128)


# ----------------------------------------------------------------------------- batching

def _segments(rows):
    """(tokens, labels) of every packed example, with positions/segment layout checked."""
    out = []
    for r in range(len(rows["tokens"])):
        seg = rows["segments"][r]
        n = int(seg.max())
        assert set(np.unique(seg)) <= set(range(n + 1))
        for s in range(1, n + 1):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))  # contiguous
            assert np.array_equal(rows["positions"][r, idx], np.arange(len(idx)))
            out.append((tuple(rows["tokens"][r, idx]), tuple(rows["labels"][r, idx])))
        pad = seg == 0
        assert (rows["labels"][r, pad] == IGNORE_INDEX).all() and not pad[:int((~pad).sum())].any()
    return sorted(out)


def test_packing_and_bucketing(zh_sft_512):
    examples, _ = zh_sft_512
    want = sorted((tuple(e.input_ids), tuple(e.labels)) for e in examples)

    rows = pack_examples(examples, 512)
    assert rows["tokens"].shape[1] == 512 and all(v.dtype == np.int32 for v in rows.values())
    assert _segments(rows) == want  # every example, every labelled token, exactly once
    assert int((rows["labels"] != IGNORE_INDEX).sum()) == sum(int((e.labels != IGNORE_INDEX).sum()) for e in examples)
    lower_bound = -(-sum(len(e) for e in examples) // 512)
    assert len(rows["tokens"]) <= lower_bound * 1.02 + 1

    batches = bucket_batches(examples, 16, seed=0)
    assert all(b["tokens"].shape[1] % 64 == 0 for b in batches)
    assert _segments({k: np.concatenate([np.pad(b[k], ((0, 0), (0, 512 - b[k].shape[1])),
                                                constant_values=IGNORE_INDEX if k == "labels" else 0)
                                         for b in batches]) for k in batches[0]}) == want
    order0 = [b["tokens"].shape for b in batches]
    assert order0 != [b["tokens"].shape for b in bucket_batches(examples, 16, seed=1)]  # seeded shuffle

    naive, bucket, packed = naive_padding_fraction(examples, 512), padding_fraction(batches), padding_fraction(rows)
    print(f"\nzh-sft ({len(examples)} examples, max_length 512) padding fraction: naive {naive:.3f}, "
          f"bucketing(16) {bucket:.3f}, packing {packed:.3f} ({len(rows['tokens'])} rows, bound {lower_bound})")
    assert packed < bucket < naive
    assert packed < 0.02


def test_pack_small():
    exs = [EncodedExample(np.arange(1, n + 1, dtype=np.int32) + 100 * k, np.full(n, k, np.int32))
           for k, n in enumerate([6, 5, 4, 3, 2])]
    rows = pack_examples(exs, 8)
    # first-fit decreasing: [6,2], [5,3], [4]
    assert rows["segments"].tolist() == [[1] * 6 + [2] * 2, [1] * 5 + [2] * 3, [1] * 4 + [0] * 4]
    assert rows["positions"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    assert rows["tokens"][2].tolist() == [201, 202, 203, 204, 0, 0, 0, 0]
    assert rows["labels"][2].tolist() == [2, 2, 2, 2] + [IGNORE_INDEX] * 4
    with pytest.raises(ValueError, match="does not fit"):
        pack_examples(exs, 5)

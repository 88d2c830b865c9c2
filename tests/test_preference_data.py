"""Preference pairs: record formats, ids shared with SFT encoding, truncation, real files, batches."""
import json

import numpy as np
import pytest

from llama_jax.data.records import Conversation, Stats
from llama_jax.data.sft_examples import IGNORE_INDEX, encode
from llama_jax.data.preference import PairExample, encode_pair, load_pairs, pair_batch, to_preference
from llama_jax.data.sources import DataError
from llama_jax.text import load_tokenizer

ZH_SYSTEM = "You are a helpful assistant. 你是一个乐于助人的助手。"


@pytest.fixture(scope="module")
def tok(data_dir):
    return load_tokenizer(data_dir / "llama2-tokenizer" / "tokenizer.model")


def test_formats():
    p = to_preference({"prompt": "Q", "chosen": "good", "rejected": "bad"})
    assert (p.conversation.system, p.conversation.messages) == (None, [("user", "Q")])
    assert (p.chosen, p.rejected) == ("good", "bad")

    p = to_preference({"question": "Q", "response_chosen": "good", "response_rejected": "bad"})
    assert (p.conversation.messages, p.chosen, p.rejected) == ([("user", "Q")], "good", "bad")

    p = to_preference({"instruction": "Translate.", "input": "你好", "chosen": "Hello", "rejected": "Bye",
                       "system": "S", "history": [["h1", "a1"]]})
    assert p.conversation.system == "S"
    assert p.conversation.messages == [("user", "h1"), ("assistant", "a1"), ("user", "Translate.\n你好")]
    assert p.conversation.inputs == {2: ("Translate.", "你好")}

    p = to_preference({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}],
                       "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}})
    assert (p.conversation.system, p.conversation.messages) == ("S", [("user", "Q")])
    assert (p.chosen, p.rejected) == ("good", "bad")

    p = to_preference({"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                                         {"from": "human", "value": "Q2"}], "chosen": "good", "rejected": "bad"})
    assert p.conversation.messages == [("user", "Q1"), ("assistant", "A1"), ("user", "Q2")]

    p = to_preference({"instruction": "Q", "input": "", "output": ["best", "second", "third"], "history": []})
    assert (p.chosen, p.rejected) == ("best", "second")


def test_pair_ids_match_sft_encoding(tok):
    """prompt + chosen == the SFT encoding of the conversation ending in the chosen reply."""
    sp = tok.sp
    p = to_preference({"conversations": [{"from": "human", "value": "第一问"}, {"from": "gpt", "value": "第一答"},
                                         {"from": "human", "value": "第二问"}],
                       "chosen": {"from": "gpt", "value": "好的回答"}, "rejected": {"from": "gpt", "value": "差的"}})
    for name in ("llama2-chat", "chinese-alpaca-2", "alpaca"):
        pair = encode_pair(p, tok, name, 1024)
        for reply, ids in ((p.chosen, pair.chosen_ids), (p.rejected, pair.rejected_ids)):
            conv = Conversation(p.conversation.system, p.conversation.messages + [("assistant", reply)])
            ex = encode(conv, tok, name, 1024)
            assert np.array_equal(np.concatenate([pair.prompt_ids, ids]), ex.input_ids)
            n = len(pair.prompt_ids)
            assert (ex.labels[n:] == ids).all()  # the response ids are the last turn's labels
            assert ids[-1] == tok.eos_token_id and pair.prompt_ids[0] == tok.bos_token_id
    pair = encode_pair(p, tok, "chinese-alpaca-2", 1024)
    assert list(pair.prompt_ids) == (
        [1] + sp.encode(f"[INST] <<SYS>>\n{ZH_SYSTEM}\n<</SYS>>\n\n第一问 [/INST] 第一答 ") + [2]
        + [1] + sp.encode("[INST] 第二问 [/INST]"))
    assert list(pair.chosen_ids) == sp.encode("[INST] 第二问 [/INST] 好的回答 ")[len(sp.encode("[INST] 第二问 [/INST]")):] + [2]
    assert tok.decode(pair.chosen_ids) == "好的回答 "


def test_truncation(tok):
    p = to_preference({"prompt": "问" * 200, "chosen": "好" * 100, "rejected": "坏" * 30})
    full = encode_pair(p, tok, "llama2-chat", 4096)
    P, C, R = len(full.prompt_ids), len(full.chosen_ids), len(full.rejected_ids)
    assert P > 200 and C > 100 and R > 30

    st = Stats()
    pair = encode_pair(p, tok, "llama2-chat", P + C, stats=st)
    assert st.counts == {}
    # prompt cut from the left to the room the longer response leaves; BOS and the end kept
    pair = encode_pair(p, tok, "llama2-chat", P + C - 10, stats=st)
    assert len(pair.prompt_ids) == P - 10 and st.counts == {"truncated_prompt": 1}
    assert pair.prompt_ids[0] == 1 and list(pair.prompt_ids[1:]) == list(full.prompt_ids[11:])
    assert np.array_equal(pair.chosen_ids, full.chosen_ids) and np.array_equal(pair.rejected_ids, full.rejected_ids)
    # prompt down to max_prompt_length (default max_length // 2), then responses cut to the room left
    pair = encode_pair(p, tok, "llama2-chat", 200, stats=st)
    assert len(pair.prompt_ids) == 100 and list(pair.prompt_ids[-20:]) == list(full.prompt_ids[-20:])
    assert np.array_equal(pair.chosen_ids, full.chosen_ids[:100])
    assert np.array_equal(pair.rejected_ids, full.rejected_ids)  # already fits
    assert st["truncated_prompt"] == 2 and st["truncated_response"] == 1
    pair = encode_pair(p, tok, "llama2-chat", 200, max_prompt_length=150, stats=st)
    assert len(pair.prompt_ids) == 150 and len(pair.chosen_ids) == len(pair.rejected_ids) == 50
    # responses that only differ after the cut carry no preference: dropped
    same_start = to_preference({"prompt": "问", "chosen": "同" * 50 + "甲", "rejected": "同" * 50 + "乙"})
    assert encode_pair(same_start, tok, "llama2-chat", 40, stats=st) is None
    assert st["skipped_identical_after_truncation"] == 1


# (records, pairs, other counts) with chinese-alpaca-2, LLaMA-2 tokenizer, max_length 512
EXPECTED_512 = {
    "oaast_rm_zh.json": (775, 772, {"skipped_identical_responses": 3, "truncated_prompt": 195,
                                    "truncated_response": 351}),
    "dpo_zh_demo.json": (300, 300, {"truncated_prompt": 82, "truncated_response": 200}),
    "dpo_zh_500.jsonl": (500, 500, {"truncated_prompt": 141, "truncated_response": 327}),
    "medical_reward_100.jsonl": (100, 100, {"truncated_prompt": 4, "truncated_response": 24}),
}


def test_real_pref_files(data_dir, tok):
    files = [str(data_dir / "zh-pref" / f) for f in EXPECTED_512]
    pairs, stats = load_pairs(files, tok, "chinese-alpaca-2", 512)
    print("\nzh-pref, chinese-alpaca-2, max_length 512:\n" + stats.report())
    for f, (records, n, extra) in EXPECTED_512.items():
        assert dict(stats.per_file[str(data_dir / "zh-pref" / f)]) == {"records": records, "pairs": n, **extra}, f
    assert len(pairs) == stats["pairs"] == 1672
    for p in pairs:
        assert len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 512
        assert p.prompt_ids[0] == tok.bos_token_id and not np.array_equal(p.chosen_ids, p.rejected_ids)
    # with room for everything nothing is cut, and every response ends with EOS
    pairs, stats = load_pairs(files, tok, "llama2-chat", 10 ** 6)
    assert stats.counts == {"records": 1675, "pairs": 1672, "skipped_identical_responses": 3}
    assert all(p.chosen_ids[-1] == p.rejected_ids[-1] == tok.eos_token_id for p in pairs)
    # the 64 system-prompted dpo_zh_demo records keep their own system prompt
    demo = [to_preference(r) for r in json.loads((data_dir / "zh-pref" / "dpo_zh_demo.json").read_text())]
    assert sum(p.conversation.system is not None for p in demo) == 64
    # oaast_rm_zh: output[0] is chosen; 3 records rank two identical texts first
    with pytest.raises(DataError, match=r"oaast_rm_zh\.json: record \d+: field 'rejected': chosen and rejected"):
        load_pairs(files[0], tok, "llama2-chat", 512, on_error="error")


BAD = [  # (record, reason, field)
    ({"prompt": "Q", "chosen": "c"}, "missing_field", "rejected"),
    ({"chosen": "c", "rejected": "r"}, "missing_field", "prompt"),
    ({"prompt": "Q", "chosen": "", "rejected": "r"}, "empty_response", "chosen"),
    ({"prompt": "Q", "chosen": "c", "rejected": 5}, "non_string", "rejected"),
    ({"prompt": "Q", "chosen": "same", "rejected": "same "}, "identical_responses", "rejected"),
    ({"prompt": " ", "chosen": "c", "rejected": "r"}, "empty_prompt", "prompt"),
    ({"instruction": "Q", "output": ["only one"]}, "too_few_responses", "output"),
    ({"instruction": "Q", "output": ["a", ""]}, "empty_response", "output[1]"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "chosen": "c",
      "rejected": "r"}, "roles_out_of_order", "conversations[1]"),
    ({"conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}], "chosen": "c",
      "rejected": "r"}, "roles_out_of_order", "conversations[0].from"),
    ({"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "human", "value": "c"},
      "rejected": "r"}, "roles_out_of_order", "chosen.from"),
    ({"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt"}, "rejected": "r"},
     "missing_field", "chosen.value"),
    ({"conversations": [], "chosen": "c", "rejected": "r"}, "empty_prompt", "conversations"),
]


def test_bad_records(tmp_path, tok):
    good = {"prompt": "Q", "chosen": "c", "rejected": "r"}
    path = tmp_path / "pref.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good] + [r for r, _, _ in BAD] + [good]), encoding="utf-8")
    pairs, st = load_pairs(path, tok, "llama2-chat", 64)
    want = {"records": len(BAD) + 2, "pairs": 2}
    for _, reason, _ in BAD:
        want[f"skipped_{reason}"] = want.get(f"skipped_{reason}", 0) + 1
    assert st.counts == want
    for k, (rec, reason, field) in enumerate(BAD):
        p = tmp_path / f"bad{k}.json"
        p.write_text(json.dumps([good, good, rec]), encoding="utf-8")
        with pytest.raises(DataError) as e:
            load_pairs(p, tok, "llama2-chat", 64, on_error="error")
        assert str(e.value).startswith(f"{p}: record 2: field '{field}'"), str(e.value)


def test_pair_batch():
    a = PairExample(np.array([1, 10, 11], np.int32), np.array([20, 2], np.int32), np.array([30, 31, 32, 2], np.int32))
    b = PairExample(np.array([1, 12], np.int32), np.array([21, 22, 2], np.int32), np.array([2], np.int32))
    out = pair_batch([a, b], pad_id=0)
    assert {k: v.shape for k, v in out.items()} == {k: (4, 7) for k in ("input_ids", "attention_mask", "loss_mask")}
    assert out["input_ids"].tolist() == [[1, 10, 11, 20, 2, 0, 0],      # chosen a
                                         [1, 12, 21, 22, 2, 0, 0],      # chosen b
                                         [1, 10, 11, 30, 31, 32, 2],    # rejected a
                                         [1, 12, 2, 0, 0, 0, 0]]        # rejected b
    assert out["attention_mask"].tolist() == [[1] * 5 + [0] * 2, [1] * 5 + [0] * 2, [1] * 7, [1] * 3 + [0] * 4]
    assert out["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0, 0],
                                         [0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0, 0]]
    assert pair_batch([a, b], pad_id=32000, multiple=8)["input_ids"].shape == (4, 8)
    assert pair_batch([a], pad_id=32000, multiple=8)["input_ids"][0, -1] == 32000
    assert IGNORE_INDEX == -100

"""The demo's built-in task: writing numbers and dates in Chinese characters.

Seeded and checkable, so every stage of the pipeline has a true metric:
  把4096写成汉字。            -> 四千零九十六
  把2023年5月12日写成汉字。   -> 二〇二三年五月十二日

Readings follow the standard (GB/T 15835) rules: 零 marks one or more skipped places inside a
number (1005 -> 一千零五, 10010 -> 一万零一十), a leading 1 of the tens place is dropped only at the
start (15 -> 十五, 115 -> 一百一十五), 二 is used throughout (not 两), and years are read digit by
digit with 〇.  The number range is split into disjoint train and test sets by a hash of the
number, so exact-match on the test prompts measures generalisation, not memory.
"""
from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

import numpy as np

from .text import load_tokenizer

DIGITS = "零一二三四五六七八九"
YEAR_DIGITS = "〇一二三四五六七八九"
UNITS = ["", "十", "百", "千"]


def _below_10000(n: int) -> str:
    """Reading of 1 <= n < 10000, leading 一十 kept (the caller drops it at the very start)."""
    out, zero = [], False
    for place in (3, 2, 1, 0):
        d = n // 10 ** place % 10
        if d == 0:
            zero = bool(out)  # a gap after something was written
            continue
        if zero:
            out.append("零")
            zero = False
        out.append(DIGITS[d] + UNITS[place])
    return "".join(out)


def number_to_zh(n: int) -> str:
    """Chinese reading of 0 <= n < 10**8."""
    if not 0 <= n < 10 ** 8:
        raise ValueError(f"number_to_zh: {n} outside [0, 10**8)")
    if n == 0:
        return "零"
    high, low = divmod(n, 10000)
    if high:
        s = _below_10000(high) + "万"
        if low:
            s += ("零" if low < 1000 else "") + _below_10000(low)
    else:
        s = _below_10000(low)
    return s[1:] if s.startswith("一十") else s


def date_to_zh(y: int, m: int, d: int) -> str:
    return "".join(YEAR_DIGITS[int(c)] for c in str(y)) + f"年{number_to_zh(m)}月{number_to_zh(d)}日"


def colloquial(answer: str) -> str:
    """`answer` (a standard reading) as it is often written instead: 零 for 〇 in a year
    (二〇二三年 -> 二零二三年), 两 for a leading 2 of the hundreds (二百 -> 两百), 十 without its 一
    after 百 (一百一十五 -> 一百十五).  `answer` itself when none of them applies."""
    if "年" in answer:
        year, rest = answer.split("年", 1)
        return year.replace("〇", "零") + "年" + rest
    out = answer.replace("百一十", "百十")
    return "两" + out[1:] if out.startswith("二百") else out


_DAYS = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


@dataclass(frozen=True)
class Example:
    kind: str      # "number" | "date"
    question: str  # the user message
    answer: str    # the one correct response
    digits: str    # the value as written with Arabic digits (for corpus sentences)


def _is_test(key: str, test_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return h / 2 ** 64 < test_fraction


class SyntheticTask:
    """Numbers in [0, max_number] and dates in [min_year, max_year], split train/test by hash."""

    def __init__(self, max_number: int = 999, min_year: int = 1900, max_year: int = 2099,
                 date_fraction: float = 0.3, test_fraction: float = 0.1):
        self.max_number, self.min_year, self.max_year = max_number, min_year, max_year
        self.date_fraction, self.test_fraction = date_fraction, test_fraction

    def _number(self, rng: random.Random) -> Example:
        # log-uniform over the number of digits, so short numbers are not swamped by long ones
        width = rng.randint(1, len(str(self.max_number)))
        n = rng.randint(0 if width == 1 else 10 ** (width - 1), min(10 ** width - 1, self.max_number))
        return Example("number", f"把{n}写成汉字。", number_to_zh(n), str(n))

    def _date(self, rng: random.Random) -> Example:
        y, m = rng.randint(self.min_year, self.max_year), rng.randint(1, 12)
        d = rng.randint(1, _DAYS[m - 1])
        digits = f"{y}年{m}月{d}日"
        return Example("date", f"把{digits}写成汉字。", date_to_zh(y, m, d), digits)

    def sample(self, rng: random.Random, split: str) -> Example:
        """One example of `split` ("train" | "test"), rejection-sampled on the hash split."""
        want_test = split == "test"
        while True:
            ex = self._date(rng) if rng.random() < self.date_fraction else self._number(rng)
            if _is_test(ex.digits, self.test_fraction) == want_test:
                return ex

    def examples(self, n: int, split: str, seed: int) -> list[Example]:
        rng = random.Random(f"{split}:{seed}")
        return [self.sample(rng, split) for _ in range(n)]

    @staticmethod
    def corpus_line(exs: list[Example], rng: random.Random) -> str:
        """A pretraining 'document': several facts in running Chinese text."""
        forms = ["{d}写作{z}。", "{d}读作{z}。", "{d}用汉字写是{z}。", "{d}的汉字写法是{z}。"]
        return "".join(rng.choice(forms).format(d=e.digits, z=e.answer) for e in exs)

    def corpus(self, n_lines: int, split: str, seed: int, facts_per_line: int = 6) -> list[str]:
        rng = random.Random(f"corpus:{split}:{seed}")
        return [self.corpus_line([self.sample(rng, split) for _ in range(facts_per_line)], rng)
                for _ in range(n_lines)]

    CORRUPTIONS = ("numeral", "neighbour", "zero", "truncated", "digits", "colloquial")

    def corrupt(self, ex: Example, rng: random.Random, weights: dict[str, float] | None = None) -> tuple[str, str]:
        """(a wrong answer near the right one, its kind): the rejected side of a preference pair.
        Kinds: one numeral changed, a neighbouring value's reading, 零 dropped or added, the answer
        cut short, the digits copied back instead of written out, the `colloquial` form (only where
        one differs); uniform, or drawn with `weights`
        (kind -> weight; a kind that does not apply to `ex` is redrawn)."""
        if weights is not None:
            bad = sorted(set(weights) - set(self.CORRUPTIONS))
            if bad or not any(w > 0 for w in weights.values()) or any(w < 0 for w in weights.values()):
                raise ValueError(f"corrupt: weights {weights} (kinds: {', '.join(self.CORRUPTIONS)}, "
                                 "non-negative, not all 0)")
            kinds = [k for k in weights if weights[k] > 0]
        while True:
            if weights is not None and not kinds:  # no weighted kind applies to this example
                raise ValueError(f"corrupt: none of the kinds weighted in {weights} applies to {ex.answer!r}")
            kind = rng.choice(self.CORRUPTIONS) if weights is None else rng.choices(kinds, [weights[k] for k in kinds])[0]
            a = ex.answer
            if kind == "numeral":
                pos = [i for i, c in enumerate(a) if c in DIGITS[1:] or c in YEAR_DIGITS]
                if not pos:
                    if weights is not None:
                        kinds.remove(kind)
                    continue
                i = rng.choice(pos)
                table = YEAR_DIGITS if ex.kind == "date" and i < 4 else DIGITS[1:]
                bad = a[:i] + rng.choice([c for c in table if c != a[i]]) + a[i + 1:]
            elif kind == "neighbour":
                if ex.kind == "number":
                    n = int(ex.digits)
                    bad = number_to_zh(max(0, n + rng.choice([-10, -1, 1, 10, 100])))
                else:
                    bad = a.replace("年", "年" + rng.choice(DIGITS[1:]), 1) if rng.random() < 0.5 else a[:-1] + "号"
            elif kind == "zero":
                bad = a.replace("零", "", 1) if "零" in a else a[:1] + "零" + a[1:]
            elif kind == "colloquial":
                bad = colloquial(a)
                if bad == a:
                    if weights is not None:
                        kinds.remove(kind)
                    continue
            elif kind == "truncated":
                if len(a) < 2:
                    if weights is not None:
                        kinds.remove(kind)
                    continue
                bad = a[:rng.randint(1, len(a) - 1)]
            else:
                bad = ex.digits
            if bad and bad != a:
                return bad, kind

    def check(self, ex: Example, response: str) -> bool:
        return response.strip() == ex.answer


_EN_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
            "sixteen seventeen eighteen nineteen").split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_to_en(n: int) -> str:
    """English reading of 0 <= n < 10**6 (text for the demo's on-the-fly base tokenizer)."""
    if n < 20:
        return _EN_ONES[n]
    if n < 100:
        return _EN_TENS[n // 10] + ("-" + _EN_ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return _EN_ONES[n // 100] + " hundred" + (" " + number_to_en(n % 100) if n % 100 else "")
    return number_to_en(n // 1000) + " thousand" + (" " + number_to_en(n % 1000) if n % 1000 else "")


_QUESTION = re.compile(r"把(\d+)写成汉字|把(\d+)年(\d+)月(\d+)日写成汉字")


def answer_of(question: str) -> str | None:
    """The correct answer of a question found in `question` (e.g. a rendered prompt), else None."""
    m = _QUESTION.search(question)
    if m is None:
        return None
    if m.group(1) is not None:
        n = int(m.group(1))
        return number_to_zh(n) if n < 10 ** 8 else None
    y, mo, d = (int(g) for g in m.group(2, 3, 4))
    return date_to_zh(y, mo, d) if 1 <= mo <= 12 and 1 <= d <= 31 else None


def answer_credit(response: str, answer: str, partial: float) -> float:
    """1 for the exact answer, else `partial` x the share of the answer's characters the response
    has in place (position by position, over the longer of the two), so a reply one numeral off
    scores higher than one three off, and never as high as the exact answer (partial < 1)."""
    if response == answer:
        return 1.0
    if not partial:
        return 0.0
    same = sum(a == b for a, b in zip(response, answer))
    return partial * same / max(len(response), len(answer), 1)


def exact_match_reward(tokenizer: str, partial: float = 0.0):
    """A PPO / GRPO reward function (reward_fn = "llama_jax.synthetic:exact_match_reward",
    reward_fn_args = {tokenizer: DIR}): 1 when the decoded response is exactly the answer to the
    question in the decoded prompt, else 0, or with `partial` > 0 the graded credit of
    `answer_credit` (no EOS: missing_eos_score applies).  A prompt without a question scores 0."""
    if not 0.0 <= partial < 1.0:
        raise ValueError(f"exact_match_reward: partial={partial} must be in [0, 1)")
    tok = load_tokenizer(tokenizer)

    def reward(prompt_ids, response_ids, mask):
        out = np.zeros(len(prompt_ids), np.float32)
        for i, (p, r, m) in enumerate(zip(prompt_ids, response_ids, mask)):
            want = answer_of(tok.decode([int(t) for t in p], skip_special_tokens=True))
            got = tok.decode([int(t) for t, k in zip(r, m) if k > 0], skip_special_tokens=True).strip()
            out[i] = 0.0 if want is None else answer_credit(got, want, partial)
        return out

    return reward

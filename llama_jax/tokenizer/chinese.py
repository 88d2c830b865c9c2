"""Which characters count as Chinese (Han characters and CJK punctuation/forms)."""

from __future__ import annotations

# Ranges of code points used in Chinese text but not in English (or other non-CJK) text.
_CHINESE_RANGES = (
    (0x2E80, 0x2FDF),  # CJK radicals, Kangxi radicals
    (0x2FF0, 0x2FFF),  # ideographic description characters
    (0x3000, 0x303F),  # CJK symbols and punctuation (、。「」《》 ...)
    (0x3100, 0x312F),  # Bopomofo
    (0x31A0, 0x31BF),  # Bopomofo extended
    (0x31C0, 0x31EF),  # CJK strokes
    (0x3200, 0x33FF),  # enclosed CJK letters, CJK compatibility
    (0x3400, 0x4DBF),  # CJK unified ideographs extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFE10, 0xFE1F),  # vertical forms
    (0xFE30, 0xFE4F),  # CJK compatibility forms
    (0xFF00, 0xFFEF),  # halfwidth and fullwidth forms (，！（） ...)
    (0x20000, 0x3FFFF),  # CJK unified ideographs extensions B and later
)


def is_chinese_char(char: str) -> bool:
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _CHINESE_RANGES)


def has_chinese(text: str) -> bool:
    return any(is_chinese_char(c) for c in text)

"""llama_jax.fsutil: the one atomic-write helper (HF dirs, PEFT adapters, checkpoints, tokenizer files).
The merge mode (replace=False) is also covered in test_tokenizer_units.py."""
import os

import pytest

from llama_jax.fsutil import atomic_output_dir, write_text_atomic


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_replace_swaps_the_whole_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "model-00001-of-00002.safetensors").write_text("old shard")
    (target / "config.json").write_text("old")
    with atomic_output_dir(target, replace=True) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        (tmp / "config.json").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]  # no stale file survives
    assert (target / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or .old directory left


def test_replace_keeps_the_old_directory_on_error(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(target, replace=True) as tmp:
            (tmp / "config.json").write_text("partial")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert (target / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("replace", [False, True])
def test_new_directory_appears_complete_with_default_mode(tmp_path, replace):
    target = tmp_path / "a" / "out"  # missing parents are created
    with atomic_output_dir(target, replace=replace) as tmp:
        (tmp / "f").write_text("x")
        assert not target.exists()  # nothing visible before the block ends
    assert (target / "f").read_text() == "x"
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()  # as mkdir would make it, not mkdtemp's 0700
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


def test_write_text_atomic_replaces_and_leaves_no_temp(tmp_path):
    f = tmp_path / "d" / "x.json"
    write_text_atomic(f, "one")
    write_text_atomic(f, "二")
    assert f.read_text(encoding="utf-8") == "二"
    assert f.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert [p.name for p in f.parent.iterdir()] == ["x.json"]

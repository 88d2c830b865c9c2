"""Slow: a generated corpus (LLAMA_JAX_SCALE_MB, default 3 GB) tokenises with 2 processes and trains a toy
model for a few steps with the peak RSS of each command's process tree <= 2 GB (scripts/bench/data_scale.py)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_corpus_larger_than_budget_tokenises_and_trains_in_2gb(tmp_path, data_dir):
    mb = os.environ.get("LLAMA_JAX_SCALE_MB", "3072")
    out = tmp_path / "scale.json"
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench", "data_scale.py"), "--mb", mb,
                        "--work", str(tmp_path / "work"), "--steps", "3", "--json", str(out)],
                       capture_output=True, text=True, env={**os.environ, "LLAMA_JAX_DATA": str(data_dir)})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["tokenize"]["rc"] == 0 and res["pretrain"]["rc"] == 0, res
    assert res["mb"] >= float(mb)
    for k in ("tokenize", "pretrain"):
        assert res[k]["tree_peak_rss_mb"] <= 2048 and res[k]["time_v_max_rss_mb"] <= 2048, res
    assert len(res["losses"]) == 3 and res["losses"][-1] < res["losses"][0]

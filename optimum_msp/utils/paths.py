"""Where the library reads local data from and caches converted models.

Two environment variables steer it:

* ``OPTIMUM_MSP_DATA_DIR``: a folder holding local copies of the evaluation sets
  (layout of ``shared/data``: ``wikitext-2-raw/wiki.test.raw``, ``arc_easy/test.jsonl``, ...).
  When unset, ``../shared/data`` is used if it exists (seen from the working directory or
  from a source checkout of this package); otherwise datasets come from the Hub.
* ``OPTIMUM_MSP_CACHE``: where bundled models are converted to plain HF folders
  (default ``~/.cache/optimum_msp``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

DATA_DIR_ENV = "OPTIMUM_MSP_DATA_DIR"
CACHE_DIR_ENV = "OPTIMUM_MSP_CACHE"


def local_data_dir() -> Optional[Path]:
    """The local evaluation-data folder, or ``None`` when only the Hub can serve data."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        path = Path(configured).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"{DATA_DIR_ENV}={configured!r} is not a folder. Point it at a folder laid out like "
                "shared/data (e.g. wikitext-2-raw/wiki.test.raw), or unset it to use the Hub."
            )
        return path
    checkout_root = Path(__file__).resolve().parents[2]
    for candidate in (Path.cwd().parent / "shared" / "data", checkout_root.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def cache_dir() -> Path:
    """Root of the library's own cache (converted bundled models, Fisher traces...)."""
    path = Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "optimum_msp")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path

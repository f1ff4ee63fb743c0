"""Where the library reads local data from and caches converted models.

Two environment variables steer it:

* ``OPTIMUM_MSP_DATA_DIR``: a folder holding local copies of the evaluation sets
  (``wikitext-2-raw/wiki.test.raw``, ``arc_easy/test.jsonl``, ...). When unset, datasets come from the
  Hub (or pass a local file path as the dataset). The library never guesses a folder from where it runs.
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
                f"{DATA_DIR_ENV}={configured!r} is not a folder. Point it at a folder of local datasets "
                "(e.g. holding wikitext-2-raw/wiki.test.raw), or unset it to use the Hub."
            )
        return path
    return None


def cache_dir() -> Path:
    """Root of the library's own cache (converted bundled models, Fisher traces...)."""
    path = Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "optimum_msp")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path

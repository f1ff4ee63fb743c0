"""Run a script in a fresh interpreter where ``import optimum_msp`` fails, as if the package were not installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_without_optimum_msp(script: str, *args, tmp_path: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    """``script`` (source text) run with ``args``; nothing may download (``HF_HUB_OFFLINE=1``)."""
    path = tmp_path / "stock_script.py"
    path.write_text(script)
    blocker = tmp_path / "block"
    (blocker / "optimum_msp").mkdir(parents=True, exist_ok=True)
    (blocker / "optimum_msp" / "__init__.py").write_text("raise ImportError('optimum_msp is not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(path), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)

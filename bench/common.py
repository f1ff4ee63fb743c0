"""Shared helpers of the benchmark scripts (not part of the library)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

from optimum_msp.pruner import peak_rss_mb  # noqa: F401  (re-exported for the bench scripts)

RESULTS = Path(__file__).parent / "results"

# The library reads local data only from OPTIMUM_MSP_DATA_DIR; the benchmarks use the shared copies beside the
# checkout unless the caller chose another folder.
_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if _SHARED_DATA.is_dir():
    os.environ.setdefault("OPTIMUM_MSP_DATA_DIR", str(_SHARED_DATA))


def git_commit() -> str:
    """The commit the benchmark ran on (``+dirty`` when the tree had uncommitted changes), or ``"unknown"``."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def append_result(path: Path, row: Dict) -> None:
    """Append one result row; every row records the commit it ran on."""
    row.setdefault("commit", git_commit())
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def read_results(path: Path) -> List[Dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_isolated(script: str, args: Iterable[str]) -> int:
    """Run one benchmark row in a fresh process so its peak RSS is its own."""
    return subprocess.call([sys.executable, script, *args])


def without_flags(argv: List[str], flags: Iterable[str]) -> List[str]:
    """``argv`` minus every flag of ``flags`` and its values (``--rows a b``, ``--seeds=0,1``)."""
    flags = tuple(flags)
    passthrough, skipping = [], False
    for item in argv:
        if item in flags:
            skipping = True
            continue
        if item.split("=", 1)[0] in flags:
            continue
        if skipping and not item.startswith("--"):
            continue
        skipping = False
        passthrough.append(item)
    return passthrough


def run_rows(script: str, rows: Iterable[str], argv: List[str], drop: Iterable[str] = (),
             extra: Iterable[str] = ()) -> None:
    """Run every row in its own process, passing on the command line minus ``--rows ...`` (and ``drop``), plus
    ``extra``."""
    passthrough = [*without_flags(argv, ("--rows", *drop)), *extra]
    for row in rows:
        run_isolated(script, [*passthrough, "--single", row])


class Timer:
    """Wall and process-CPU seconds. On a shared 2-core machine the CPU time of a 1-thread run is the
    robust cost measure (wall time also counts what other processes took)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def timed_block_forward(model, calibration: torch.Tensor, block_name=None) -> Timer:
    """One forward pass of the calibration set through the decoder blocks (the unit the prune cost is
    compared to): capture the first block's inputs, then run every block."""
    from optimum_msp.modeling.sequential import BlockRunner

    runner = BlockRunner(model, block_name)
    with Timer() as timer:
        inputs = runner.capture(calibration)
        for index in range(len(runner.blocks)):
            runner.advance(index, inputs)
    return timer


def wikitext_test_windows(tokenizer, windows: Optional[int] = None):
    """``(ids, bos)``: the first ``windows`` 2048-token windows of WikiText-2 test (``None``: all 148), as every PPL
    here reads them, and whether they start with BOS (``bos="auto"``; SmolLM2: no, its tokenizer adds none)."""
    from optimum_msp.data import evaluation_windows, resolve_bos
    from optimum_msp.evaluation import evaluation_ids

    bos_token_id = resolve_bos("auto", tokenizer)
    ids = evaluation_windows(evaluation_ids(tokenizer, "wikitext2", "test"), 2048, windows, bos_token_id)
    return ids, bos_token_id is not None


def wikitext_perplexity(model, tokenizer, windows, prefix: Optional[int] = None) -> Dict:
    """WikiText-2 test PPL on the first ``windows`` windows (``None``: all 148). A full-split run also
    reports the 16-window PPL, read from the same per-window NLLs (the first 16 windows are a prefix),
    so full rows compare with the sweep rows without a second pass; ``prefix=N`` adds ``ppl_first_N``, the PPL
    of the first N windows, the same way."""
    import math

    from optimum_msp.evaluation import window_nlls

    ids, bos = wikitext_test_windows(tokenizer, windows)
    model.eval()
    with Timer() as timer:
        nlls = window_nlls(model, ids)
    result = {"ppl": math.exp(nlls.mean().item()), "eval_windows": windows or f"all ({len(nlls)})",
              "eval_s": timer.wall, "eval_cpu_s": timer.cpu, "bos": bos}
    if windows is None or windows > SWEEP_WINDOWS:
        result["ppl_16"] = math.exp(nlls[:SWEEP_WINDOWS].mean().item())
    if prefix:
        result[f"ppl_first_{prefix}"] = math.exp(nlls[:prefix].mean().item())
    return result


SWEEP_WINDOWS = 16


def markdown_table(rows: List[Dict], columns: List[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)

"""Peak resident memory of each stage of a prune, in one process (Linux only).

Linux keeps a process's resident high-water mark (``VmHWM``) and resets it to the current resident size when 5 is
written to ``/proc/self/clear_refs``: reset when a stage starts, read when it ends, and the reading is the
stage's own peak. Stages are marked by wrapping the library functions that run them (best effort: a function
that a refactoring renamed is simply not measured). A stage that runs inside another (the captures and
statistics passes inside the MSP allocation) counts in both. Time outside every stage is ``(between)``.

Resetting the high-water mark also resets what ``getrusage`` reports as ``ru_maxrss``: the run's overall peak
is then the largest stage or ``(between)`` reading.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Dict, List

BETWEEN = "(between)"


def _hwm_kb() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def available() -> bool:
    try:
        _reset()
        _hwm_kb()
    except OSError:
        return False
    return True


class StagePeaks:
    def __init__(self):
        self.peaks_kb: Dict[str, int] = {}
        self._stack: List[str] = []
        self._patched: List[tuple] = []

    def _note(self, name: str, value: int) -> None:
        self.peaks_kb[name] = max(self.peaks_kb.get(name, 0), value)

    @contextlib.contextmanager
    def stage(self, name: str):
        outer = self._stack[-1] if self._stack else BETWEEN
        self._note(outer, _hwm_kb())
        _reset()
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()
            self._note(name, _hwm_kb())
            if outer != BETWEEN:
                self._note(outer, self.peaks_kb[name])  # the inner stage is part of the outer one
            _reset()

    def wrap(self, module: str, attribute: str, name: str) -> bool:
        """Measure every call of ``module.attribute`` (a function, or ``Class.method``) as stage ``name``."""
        try:
            owner = importlib.import_module(module)
            *path, last = attribute.split(".")
            for part in path:
                owner = getattr(owner, part)
            original = getattr(owner, last)
        except (ImportError, AttributeError):
            return False

        @functools.wraps(original)
        def measured(*args, **kwargs):
            with self.stage(name):
                return original(*args, **kwargs)

        setattr(owner, last, measured)
        self._patched.append((owner, last, original))
        return True

    def restore(self) -> None:
        for owner, last, original in reversed(self._patched):
            setattr(owner, last, original)
        self._patched.clear()

    def mb(self) -> Dict[str, float]:
        self._note(self._stack[-1] if self._stack else BETWEEN, _hwm_kb())
        return {name: round(kb / 1024) for name, kb in self.peaks_kb.items()}


def prune_stages(recorder: StagePeaks) -> List[str]:
    """Wrap the functions that run the stages of ``MSPPruner.prune``; return the stages that could be wrapped."""
    targets = [
        ("optimum_msp.modeling.sequential", "BlockRunner.capture", "capture"),
        ("optimum_msp.allocation.fisher", "fisher_traces", "fisher"),
        ("optimum_msp.allocation.owl", "outlier_ratios", "owl statistics"),
        ("optimum_msp.allocation.msp", "dense_layer_statistics", "search statistics"),
        ("optimum_msp.allocation.msp", "seeded_layer_statistics", "search statistics"),
        ("optimum_msp.allocation.search.evolution", "EvolutionarySearch.run", "search"),
        ("optimum_msp.pruner", "apply_targets", "prune"),
    ]
    return sorted({name for module, attribute, name in targets if recorder.wrap(module, attribute, name)})

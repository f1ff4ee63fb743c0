"""``MSPConfig``: every knob of a pruning run, validated, serialisable, and usable as the
``quantization_config`` of ``transformers``' ``from_pretrained`` (prune-on-load)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from transformers.utils.quantization_config import QuantizationConfigMixin

CONFIG_NAME = "msp_config.json"
QUANT_METHOD = "msp"


def parse_pattern(pattern: str) -> Tuple[str, Optional[int], Optional[int]]:
    """``"unstructured"`` -> (kind, None, None); ``"2:4"`` -> ("n:m", 2, 4); ``"mixed-n:m"`` -> (kind, None, None)."""
    text = str(pattern).strip().lower()
    if text in ("unstructured", "mixed-n:m"):
        return text, None, None
    parts = text.split(":")
    if len(parts) == 2 and all(p.strip().lstrip("-").isdigit() for p in parts):
        n, m = (int(p) for p in parts)
        if m <= 0:
            raise ValueError(f"pattern {pattern!r}: the group size M must be >= 1.")
        if not 0 <= n <= m:
            raise ValueError(
                f"pattern {pattern!r}: N (weights kept per group of M) must satisfy 0 <= N <= M; "
                f"for example '2:4' keeps 2 of every 4 weights (50% sparse)."
            )
        return "n:m", n, m
    raise ValueError(
        f"Unknown pattern {pattern!r}: use 'unstructured', an N:M such as '2:4', or 'mixed-n:m' (with m=)."
    )


@dataclass
class MSPConfig(QuantizationConfigMixin):
    """Configuration of a pruning run.

    Args:
        method: pruner, one of ``"magnitude"``, ``"wanda"``, ``"sparsegpt"`` (or any registered one).
        sparsity: target global (parameter-weighted) sparsity of the targeted layers, in [0, 1). Derived from
            ``pattern`` when that is a fixed N:M; defaults to 0.5 otherwise.
        pattern: ``"unstructured"``; a fixed ``"N:M"`` (N weights *kept* in every M consecutive inputs, so
            ``"2:4"`` is 50 % sparse); or ``"mixed-n:m"``: one N per layer for a fixed ``m``.
        m: group size M for ``"mixed-n:m"`` (default 8).
        allocation: how sparsity is spread over layers: ``"uniform"``, ``"owl"``, ``"fisher"``, ``"msp"``.
        calibration_dataset: ``"wikitext2"``, ``"c4"`` or a local ``.txt`` / ``.raw`` / ``.jsonl`` path.
        calibration_split: split to calibrate on (WikiText-2 default: ``"validation"``, since the train split
            is not always available offline).
        num_calibration_samples / seqlen / seed: random ``seqlen``-token windows, seeded.
        targets / ignore: which linear layers inside decoder blocks are pruned; plain names, name suffixes,
            class names, or ``"re:<regex>"`` on the full module name. Embeddings and ``lm_head`` are never
            pruned.
        block_name: dotted name of the decoder-block ``ModuleList`` when it cannot be found automatically.
        batch_size: calibration windows per forward pass.
        block_size / dampening: SparseGPT's column block and relative Hessian dampening.
        owl_threshold / owl_lambda: OWL's outlier multiplier and the +-range of layer sparsities.
        granularity: what one allocation level covers: ``"block"`` (all targeted linears of a decoder block)
            or ``"layer"`` (each linear on its own).
        max_deviation: non-uniform allocations keep every unit within target +- this sparsity.
        level_step: spacing of the unstructured sparsity levels (mixed N:M moves one N at a time).
        max_layer_sparsity: no unit is pruned beyond this.
        fisher_samples / fisher_seqlen: the Fisher trace sums squared per-sequence gradients over the first
            ``fisher_seqlen`` tokens of the first ``fisher_samples`` calibration windows.
        fitness: MSP search objective on held-out calibration text: ``"ppl"`` (mean next-token NLL of the
            pruned model; the default: on SmolLM2 at 75 % it found a plan with 8 % lower test perplexity than
            ``"kl"``, docs/benchmarks.md) or ``"kl"`` (KL divergence to the dense model's next-token
            distribution; keeps the dense logits of the fitness windows in memory).
        fitness_samples / fitness_seqlen: windows the fitness is measured on (disjoint from calibration).
        search_statistics: the input statistics the search's pruned weights are computed from: ``"dense"``
            (of the unpruned model) or ``"seed"`` (gathered as a sequential prune with the Fisher seed plan
            gathers them, each block's inputs coming from pruned blocks, as in the final prune). ``"auto"``
            (default): ``"seed"`` for pruners that update the kept weights (SparseGPT: on SmolLM2 at 70 % it
            found a plan with 14 % lower test perplexity than ``"dense"``, docs/benchmarks.md), ``"dense"``
            for pruners that only mask (not measured against ``"seed"`` yet).
        population_size / generations: the MSP evolutionary search budget.
        search_cache_mb: memory for the search's cache of block outputs per plan prefix (a candidate sharing
            its first k blocks' levels with an evaluated plan re-runs only the blocks after them); less memory
            means more block runs, never a different result. At least one plan's block outputs are kept.
            1 GB by default: on SmolLM2 it ran 4 % more blocks than 3 GB and peaked 3 GB lower (docs/benchmarks.md).
        search_checkpoint: file where the search saves each generation and resumes from.
    """

    method: str = "wanda"
    sparsity: Optional[float] = None
    pattern: str = "unstructured"
    m: Optional[int] = None
    allocation: str = "uniform"
    calibration_dataset: str = "wikitext2"
    calibration_split: Optional[str] = None
    num_calibration_samples: int = 32
    seqlen: int = 2048
    seed: int = 0
    targets: List[str] = field(default_factory=lambda: ["Linear"])
    ignore: List[str] = field(default_factory=list)
    block_name: Optional[str] = None
    batch_size: int = 1
    block_size: int = 128
    dampening: float = 0.01
    owl_threshold: float = 5.0
    owl_lambda: float = 0.08
    granularity: str = "block"
    max_deviation: float = 0.2
    level_step: float = 0.025
    max_layer_sparsity: float = 0.95
    fisher_samples: int = 16
    fisher_seqlen: int = 512
    fitness: str = "ppl"
    fitness_samples: int = 4
    fitness_seqlen: int = 256
    search_statistics: str = "auto"
    population_size: int = 12
    generations: int = 10
    search_cache_mb: int = 1024
    search_checkpoint: Optional[str] = None
    quant_method: str = QUANT_METHOD

    def __post_init__(self):
        self.validate()

    # --------------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        from .allocation import ALLOCATORS
        from .pruners import PRUNERS

        if self.method not in PRUNERS:
            raise ValueError(f"Unknown method {self.method!r}; choose one of {list(PRUNERS)}.")
        if self.allocation not in ALLOCATORS:
            raise ValueError(f"Unknown allocation {self.allocation!r}; choose one of {list(ALLOCATORS)}.")
        kind, n, m = parse_pattern(self.pattern)
        self.pattern = kind if n is None else f"{n}:{m}"
        if kind == "n:m":
            implied = 1.0 - n / m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"pattern {self.pattern} is {implied:.4g} sparse but sparsity={self.sparsity} was asked; drop "
                    "sparsity, or use pattern='mixed-n:m' with m= to reach another average."
                )
            if self.m is not None and self.m != m:
                raise ValueError(f"pattern {self.pattern} has M={m} but m={self.m} was given.")
            self.sparsity, self.m = implied, m
            if self.allocation != "uniform":
                # A non-uniform allocation of N:M is a per-layer N around the average N:M.
                self.pattern = kind = "mixed-n:m"
        if kind == "mixed-n:m":
            self.m = 8 if self.m is None else self.m
            if not isinstance(self.m, int) or self.m <= 0:
                raise ValueError(f"m (the N:M group size) must be a positive integer, got {self.m!r}.")
        elif kind == "unstructured" and self.m is not None:
            raise ValueError("m is only meaningful with pattern='mixed-n:m' or an N:M pattern.")
        if self.sparsity is None:
            self.sparsity = 0.5
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ValueError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}.")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1) (0.5 = half the weights removed), got {self.sparsity}.")
        self.sparsity = float(self.sparsity)
        if self.granularity not in ("block", "layer"):
            raise ValueError(f"granularity must be 'block' or 'layer', got {self.granularity!r}.")
        if self.fitness not in ("kl", "ppl"):
            raise ValueError(f"fitness must be 'kl' or 'ppl', got {self.fitness!r}.")
        if self.search_statistics not in ("auto", "dense", "seed"):
            raise ValueError(f"search_statistics must be 'auto', 'dense' or 'seed', got {self.search_statistics!r}.")
        if not 0.0 <= self.max_deviation < 1.0 or not 0.0 < self.level_step < 1.0:
            raise ValueError("max_deviation must lie in [0, 1) and level_step in (0, 1).")
        if not self.sparsity <= self.max_layer_sparsity <= 1.0:
            raise ValueError(f"max_layer_sparsity must lie in [sparsity, 1], got {self.max_layer_sparsity}.")
        for name in ("num_calibration_samples", "seqlen", "batch_size", "block_size", "population_size",
                     "fisher_samples", "fisher_seqlen", "fitness_samples", "fitness_seqlen"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("generations", "search_cache_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        if not 0.0 <= self.dampening:
            raise ValueError(f"dampening must be >= 0, got {self.dampening}.")
        if not 0.0 <= self.owl_lambda < 1.0:
            raise ValueError(f"owl_lambda must lie in [0, 1), got {self.owl_lambda}.")
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a list of strings (names, suffixes, classes or 're:' regexes).")
            else:
                setattr(self, name, list(value))
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method of an MSPConfig is {QUANT_METHOD!r}, got {self.quant_method!r}.")

    # ------------------------------------------------------------------------------------- derived views
    @property
    def nm(self) -> Optional[Tuple[int, int]]:
        """(n, m) of a fixed N:M pattern, else ``None``."""
        kind, n, m = parse_pattern(self.pattern)
        return (n, m) if kind == "n:m" else None

    @property
    def pattern_kind(self) -> str:
        return parse_pattern(self.pattern)[0]

    # -------------------------------------------------------------------------------------- persistence
    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_diff_dict(self) -> Dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config_dict) - names
        if unknown:
            raise ValueError(f"Unknown MSPConfig keys {sorted(unknown)}; known keys: {sorted(names)}.")
        config = cls(**config_dict)
        unused = {}
        for key, value in kwargs.items():
            if key in names:
                setattr(config, key, value)
            else:
                unused[key] = value
        config.validate()
        return (config, unused) if return_unused_kwargs else config

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> Path:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        target = path / CONFIG_NAME
        target.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return target

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **kwargs) -> "MSPConfig":
        """Read ``msp_config.json`` from a folder (or the file itself)."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"No {CONFIG_NAME} at {path}.")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{file} is not valid JSON: {error}") from None
        return cls.from_dict(data, **kwargs)

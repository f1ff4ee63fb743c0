"""``MSPPruner``: load a model, prune it with an :class:`MSPConfig`, save or push the result."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

import torch
from torch import nn

from . import distributed
from .allocation import ALLOCATORS, AllocationContext
from .apply import apply_targets, prune_with_statistics
from .checks import check_model
from .checkpoint import save_pruned
from .checkpoint.marker import is_pruned_checkpoint, mark_pruned
from .configuration import MSPConfig
from .data import CalibrationData
from .integrations.model_card import build_model_card, write_eval_results
from .modeling.blocks import select_linears
from .modeling.loading import base_model_id, load_model, load_tokenizer
from .modeling.sequential import BlockRunner
from .plan import CONFIG_KEY, SparsityPlan
from .pruners import build_pruner
from .report import RUN_REPORT_FILENAME, compare_allocations, write_report
from .utils.io import atomic_directory

logger = logging.getLogger(__name__)

#: the run report saved beside a checkpoint: timings, memory, counters (never in config.json)
REPORT_NAME = RUN_REPORT_FILENAME


class MSPPruner:
    """Prunes a causal LM according to an :class:`MSPConfig`.

    >>> pruner = MSPPruner.from_pretrained("smollm2-135m")
    >>> model = pruner.prune(MSPConfig(method="wanda", sparsity=0.5))
    >>> pruner.save_pretrained("out/smollm2-wanda-50")
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, base_model: Optional[str] = None,
                 device: Union[str, torch.device, None] = None):
        self.model = model
        self.tokenizer = tokenizer
        #: where blocks are computed (``None``: where the model computes; under several processes on GPUs, a bare
        #: ``"cuda"`` or none means each process's own GPU)
        device = distributed.process_device(device)
        self.device = None if device is None else torch.device(device)
        #: the Hub id the model came from (the model card's ``base_model``), when known
        self.base_model = base_model if base_model is not None else base_model_id(
            getattr(getattr(model, "config", None), "_name_or_path", None))
        self.config: Optional[MSPConfig] = None  # the resolved config of the last prune
        self.plan: Optional[SparsityPlan] = None
        #: what the last prune cost: timings, memory, counters (``report.json`` beside a saved checkpoint)
        self.report: Dict[str, Any] = {}

    @classmethod
    def from_pretrained(
        cls, model_or_path: Union[str, os.PathLike, nn.Module], tokenizer: Any = None,
        dtype: Union[str, torch.dtype, None] = "auto", device: Union[str, torch.device, None] = None,
        **model_kwargs,
    ) -> "MSPPruner":
        """From a loaded model, a Hub id, a local folder or a bundled alias (``"smollm2-135m"``).

        ``dtype``: ``"auto"`` (the checkpoint's own, the default), ``"bfloat16"``, ``"float16"``, ``"float32"``
        or a ``torch.dtype``: weights are stored and saved in it; statistics, Hessians and scores are computed in
        fp32 whatever it is. ``device``: where blocks are computed (``"cuda"``, ``"cuda:1"``, ``"cpu"``; default:
        where the model computes), one block's weights there at a time. Other keywords go to transformers'
        ``from_pretrained``, e.g. ``device_map={"model.layers.20": "disk", ...}, offload_folder="offload"``
        (the pruned weights of offloaded layers are written to the offload folder).
        """
        if isinstance(model_or_path, nn.Module):
            return cls(model_or_path, tokenizer, device=device)
        model = load_model(model_or_path, dtype=dtype, **model_kwargs)
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(model_or_path)
            except (OSError, ValueError) as error:  # data-free pruning (magnitude) does not need one
                logger.warning("No tokenizer loaded for %s (%s); calibration will need one.", model_or_path, error)
        return cls(model, tokenizer, base_model=base_model_id(model_or_path), device=device)

    # ------------------------------------------------------------------------------------------- prune
    def calibration(self, config: MSPConfig, ids: Optional[torch.Tensor] = None,
                    held_out_ids: Optional[torch.Tensor] = None) -> CalibrationData:
        """The run's calibration: ``ids`` when given (held-out windows then come from the config's dataset when
        there is a tokenizer), else windows drawn from the config's dataset with its seed."""
        if ids is not None:
            return CalibrationData.given(ids, self.tokenizer, config.calibration_dataset, config.calibration_split,
                                         config.seed, held_out_ids, bos=config.bos)
        if self.tokenizer is None:
            raise ValueError("Calibration needs a tokenizer: pass tokenizer= to MSPPruner (or calibration=).")
        data = CalibrationData.draw(self.tokenizer, config.calibration_dataset, config.num_calibration_samples,
                                    config.seqlen, config.seed, config.calibration_split, bos=config.bos)
        data.held_out_ids = held_out_ids
        return data

    def prune(self, config: Optional[MSPConfig] = None, calibration: Optional[torch.Tensor] = None,
              fitness_ids: Optional[torch.Tensor] = None, compare_with: Iterable[str] = (),
              **config_kwargs) -> nn.Module:
        """Prune the model in place and return it; the plan lands in ``model.config.sparsity_plan``.

        ``calibration`` ([samples, seqlen] token ids) overrides the dataset named in the config;
        ``fitness_ids`` the held-out windows of the MSP search (drawn from the calibration text otherwise).
        ``compare_with`` (e.g. ``("uniform", "owl")``): allocations whose per-layer sparsity for the same layers is
        recorded in ``report["comparison"]`` and drawn beside the plan (:func:`optimum_msp.report.compare_allocations`).
        What the run cost (timings, memory, counters) is in :attr:`report` afterwards.
        """
        if config is None:
            config = MSPConfig(**config_kwargs)
        elif config_kwargs:
            raise ValueError("Pass either an MSPConfig or keyword arguments, not both.")
        config = config.resolved()
        # before any weight changes: a model that cannot hold a plan (no config) or whose statistics would be NaN
        check_model(self.model)
        started = time.perf_counter()
        pruner = build_pruner(config.method, config.pruner_options())
        runner = BlockRunner(self.model, config.block_name, device=self.device)
        layers = [
            select_linears(block, f"{runner.block_prefix}.{i}", config.targets, config.ignore)
            for i, block in enumerate(runner.blocks)
        ]
        if not any(layers):
            raise ValueError(
                f"targets={config.targets} / ignore={config.ignore} select no linear layer inside the decoder blocks."
            )
        data = None
        if calibration is not None or config.needs_calibration:
            data = self.calibration(config, calibration, fitness_ids)
        context = AllocationContext(self.model, layers, config.budget(), config.allocation_options(), pruner, data,
                                    runner, config.seed, config.batch_size)
        if distributed.world_size() > 1:
            _log_shares(context)
        result = ALLOCATORS.get(config.allocation)(context)
        allocated = time.perf_counter()
        comparison = compare_allocations(context, config, compare_with)  # the weights are still dense here
        compared = time.perf_counter()
        if result.statistics is not None:  # those the search scored its plans with: the model it chose, as scored
            try:
                achieved = prune_with_statistics(runner, layers, result.targets, pruner, result.statistics)
            finally:
                getattr(result.statistics, "close", lambda: None)()
        else:
            achieved = apply_targets(runner, layers, result.targets, pruner, None if data is None else data.ids,
                                     config.batch_size)
        finished = time.perf_counter()

        self.plan = SparsityPlan.from_allocation(
            result, method=config.method, allocation=config.allocation, pattern=config.pattern_kind,
            target_sparsity=config.sparsity, m=config.m, numels=context.numels, achieved=achieved,
            calibration=data.recipe if data is not None else {
                "dataset": config.calibration_dataset, "split": config.calibration_split, "num_samples": 0,
                "seqlen": 0, "seed": config.seed},
        )
        self.config = config
        self.report = {
            "allocation_seconds": round(allocated - started, 2),
            "prune_seconds": round(finished - compared, 2),
            "allocation": dict(result.report),
            "peak_rss_mb": peak_rss_mb(),
        }
        if distributed.world_size() > 1:
            self.report["processes"] = distributed.world_size()
        if comparison:
            self.report.update(comparison=comparison, comparison_seconds=round(compared - allocated, 2))
        # the weights as stored (offloaded ones included) must hold the plan: a layer left dense is an error here,
        # never a silent result
        self.plan.verify(self.model, per_row=pruner.masks_per_row)
        setattr(self.model.config, CONFIG_KEY, self.plan.to_dict())
        # the marker that makes a reload (with optimum_msp imported) verify the weights against the plan
        mark_pruned(self.model)
        logger.info(
            "Pruned %d layers with %s/%s: global sparsity %.4f (target %.4f) in %.1fs",
            len(achieved), config.method, config.allocation, self.plan.achieved_sparsity or 0.0,
            config.sparsity, finished - started,
        )
        return self.model

    # -------------------------------------------------------------------------------------------- save
    def save_pretrained(self, save_directory: Union[str, os.PathLike], compact: Union[bool, str] = False,
                        results: Iterable[Any] = (), plot: bool = True, overwrite: bool = False, **kwargs) -> Path:
        """Atomically write weights (safetensors), ``config.json`` with the plan, ``msp_config.json``, the
        tokenizer and a ``README.md`` model card: the folder appears complete or not at all.

        A non-empty ``save_directory`` is refused (:class:`~optimum_msp.utils.io.OutputExistsError`), unless
        ``overwrite=True`` and it holds a checkpoint saved by optimum-msp: files the library did not write are
        never deleted. The run report (timings, memory) is written beside the weights as ``report.json``.

        ``plot``: also draw the plan (``sparsity_plan.png``, linked from the card and from ``report.md``) when
        matplotlib is installed. ``report.md`` (settings, plan, timings, results; :mod:`optimum_msp.report`) is
        written beside the weights too.

        ``results``: evaluation results for the card's ``model-index`` (``huggingface_hub.EvalResult`` or
        dicts of its fields; see :func:`optimum_msp.integrations.model_card.perplexity_result`), and for
        ``.eval_results/`` where the dataset is a registered Hub benchmark; partial-split results are left out.

        ``compact=True`` stores pruned layers as kept values + bitmask / N:M indices (those layers take 0.5625x
        their dense size at 50 % in bf16, 0.3125x at 75 %; unpruned tensors are stored as is);
        ``compact="deflate"`` also deflates those tensors losslessly (smaller still, slower to save). Loading
        either needs ``optimum_msp`` imported. See :mod:`optimum_msp.checkpoint.codec`.
        """
        if not distributed.is_main_process():  # under several processes, the main one writes the one copy
            return Path(save_directory)
        results = list(results)  # read twice: the card and the Hub's evaluation-results files
        with atomic_directory(save_directory, overwrite=overwrite, replaceable=is_pruned_checkpoint) as staging:
            save_pruned(self.model, staging, compact=compact, **kwargs)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(staging)
            if self.config is not None:
                self.config.save_pretrained(staging)
            if self.report:
                (Path(staging) / REPORT_NAME).write_text(json.dumps(self.report, indent=2, sort_keys=True) + "\n")
            if self.plan is not None:
                figure = _write_plot(self.plan, Path(staging), self.report.get("comparison")) if plot else None
                card = build_model_card(self.plan, self.base_model, results, plot_path=figure)
                card.save(Path(staging) / "README.md")
                write_eval_results(staging, results)
                write_report(staging)
        return Path(save_directory)

    def push_to_hub(self, repo_id: str, *, compact: Union[bool, str] = False, results: Iterable[Any] = (),
                    token: Optional[str] = None, endpoint: Optional[str] = None, private: Optional[bool] = None,
                    exist_ok: bool = False, commit_message: Optional[str] = None, revision: Optional[str] = None):
        """Save (weights, config with plan, tokenizer, model card) and upload it as one commit.

        ``token``/``endpoint`` default to ``HF_TOKEN``/``HF_ENDPOINT``; errors the user can fix raise
        :class:`optimum_msp.integrations.hub.HubError` subclasses. Returns the commit info.
        """
        from .integrations.hub import push_to_hub

        if not distributed.is_main_process():  # one upload per run, from the main process
            return None
        with tempfile.TemporaryDirectory(prefix="optimum-msp-push-") as folder:
            saved = self.save_pretrained(Path(folder) / "model", compact=compact, results=results)
            message = commit_message or (
                f"Upload {self.plan.method}/{self.plan.allocation} pruned model "
                f"({self.plan.target_sparsity:g} sparsity)"
                if self.plan else "Upload model"
            )
            return push_to_hub(saved, repo_id, token=token, endpoint=endpoint, private=private, exist_ok=exist_ok,
                               commit_message=message, revision=revision)


def _log_shares(context: AllocationContext) -> None:
    """Under several processes: how many there are and each one's share of the windows (raises now, before any
    work, when a process would get no calibration window)."""
    counts = {}
    if context.calibration is not None:
        windows = int(context.calibration.ids.shape[0])
        counts["calibration windows"] = windows
        fisher_samples = getattr(context.options, "fisher_samples", None)
        if fisher_samples is not None:
            counts["Fisher windows"] = min(fisher_samples, windows)
    line = distributed.describe_shares(counts) if counts else (
        f"{distributed.world_size()} processes, no calibration data: every process does the same work")
    if distributed.is_main_process():
        logger.info(line)


def _write_plot(plan: SparsityPlan, folder: Path, comparison: Optional[Dict[str, Dict[str, float]]] = None
                ) -> Optional[str]:
    """The plan's figure in ``folder`` (its file name), or ``None``: a figure is a nicety and never fails a save."""
    from .plotting import PLOT_FILENAME, plot_available, plot_plan

    if not plot_available():
        logger.info("matplotlib is not installed: saving without the allocation figure (pip install matplotlib).")
        return None
    try:
        plot_plan(plan, folder / PLOT_FILENAME, comparison=comparison)
    except Exception as error:  # noqa: BLE001 - e.g. a hand-edited plan with odd search data
        logger.warning("Could not draw the sparsity plan (%s); saving without the figure.", error)
        return None
    return PLOT_FILENAME


def peak_rss_mb() -> Optional[float]:
    """Peak resident memory of this process so far, in MB (``None`` where the platform does not say)."""
    try:
        import resource  # POSIX only
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux

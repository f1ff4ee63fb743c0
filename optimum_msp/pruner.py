"""``MSPPruner``: load a model, prune it with an :class:`MSPConfig`, save or push the result."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

import torch
from torch import nn

from .allocation import ALLOCATORS, AllocationContext
from .apply import apply_targets
from .configuration import MSPConfig
from .data import calibration_windows
from .integrations.model_card import build_model_card
from .integrations.transformers import mark_pruned
from .modeling.blocks import select_linears
from .modeling.loading import load_model, load_tokenizer
from .modeling.sequential import BlockRunner
from .plan import CONFIG_KEY, LayerPlan, SparsityPlan
from .pruners import get_pruner
from .utils.io import atomic_directory

logger = logging.getLogger(__name__)


class MSPPruner:
    """Prunes a causal LM according to an :class:`MSPConfig`.

    >>> pruner = MSPPruner.from_pretrained("smollm2-135m")
    >>> model = pruner.prune(MSPConfig(method="wanda", sparsity=0.5))
    >>> pruner.save_pretrained("out/smollm2-wanda-50")
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config: Optional[MSPConfig] = None
        self.plan: Optional[SparsityPlan] = None
        self.stats: Dict[str, float] = {}

    @classmethod
    def from_pretrained(
        cls, model_or_path: Union[str, os.PathLike, nn.Module], tokenizer: Any = None,
        dtype: Optional[torch.dtype] = torch.float32, **model_kwargs,
    ) -> "MSPPruner":
        """From a loaded model, a Hub id, a local folder or a bundled alias (``"smollm2-135m"``)."""
        if isinstance(model_or_path, nn.Module):
            return cls(model_or_path, tokenizer)
        model = load_model(model_or_path, dtype=dtype, **model_kwargs)
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(model_or_path)
            except (OSError, ValueError) as error:  # data-free pruning (magnitude) does not need one
                logger.warning("No tokenizer loaded for %s (%s); calibration will need one.", model_or_path, error)
        return cls(model, tokenizer)

    # ------------------------------------------------------------------------------------------- prune
    def calibration(self, config: MSPConfig) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("Calibration needs a tokenizer: pass tokenizer= to MSPPruner (or calibration=).")
        return calibration_windows(
            self.tokenizer, config.calibration_dataset, config.num_calibration_samples, config.seqlen,
            config.seed, config.calibration_split,
        )

    def prune(self, config: Optional[MSPConfig] = None, calibration: Optional[torch.Tensor] = None,
              fitness_ids: Optional[torch.Tensor] = None, **config_kwargs) -> nn.Module:
        """Prune the model in place and return it; the plan lands in ``model.config.sparsity_plan``.

        ``calibration`` ([samples, seqlen] token ids) overrides the dataset named in the config;
        ``fitness_ids`` the held-out windows of the MSP search (drawn from the calibration text otherwise).
        """
        if config is None:
            config = MSPConfig(**config_kwargs)
        elif config_kwargs:
            raise ValueError("Pass either an MSPConfig or keyword arguments, not both.")
        config.validate()
        started = time.perf_counter()
        pruner = get_pruner(config.method, block_size=config.block_size, dampening=config.dampening)
        allocator = ALLOCATORS.get(config.allocation)
        runner = BlockRunner(self.model, config.block_name)
        layers = [
            select_linears(block, f"{runner.block_prefix}.{i}", config.targets, config.ignore)
            for i, block in enumerate(runner.blocks)
        ]
        if not any(layers):
            raise ValueError(
                f"targets={config.targets} / ignore={config.ignore} select no linear layer inside the decoder blocks."
            )
        if calibration is None and (pruner.needs_calibration or allocator.needs_calibration):
            calibration = self.calibration(config)
        context = AllocationContext(self.model, config, layers, calibration, runner, self.tokenizer, fitness_ids)
        targets = allocator.fn(context)
        allocated = time.perf_counter()
        achieved = apply_targets(runner, layers, targets, pruner, calibration, config.batch_size)
        finished = time.perf_counter()

        numels = context.numels
        sensitivities = context.extras.get("layer_sensitivity", {})
        self.plan = SparsityPlan(
            method=config.method,
            pattern=config.pattern_kind,
            allocation=config.allocation,
            target_sparsity=config.sparsity,
            m=config.m,
            layers={
                name: LayerPlan(target, numels[name], achieved.get(name), sensitivities.get(name))
                for name, target in targets.items()
            },
            calibration={
                "dataset": config.calibration_dataset,
                "split": config.calibration_split,
                "num_samples": int(calibration.shape[0]) if calibration is not None else 0,
                "seqlen": int(calibration.shape[1]) if calibration is not None else 0,
                "seed": config.seed,
            },
            search=context.extras.get("search", {}),
            block_sensitivity=context.extras.get("block_sensitivity", {}),
        )
        self.config = config
        self.stats = {"allocation_seconds": allocated - started, "prune_seconds": finished - allocated}
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
                        results: Iterable[Any] = (), plot: bool = True, **kwargs) -> Path:
        """Atomically write weights (safetensors), ``config.json`` with the plan, ``msp_config.json``, the
        tokenizer and a ``README.md`` model card: the folder appears complete or not at all.

        ``plot``: also draw the plan (``sparsity_plan.png``, linked from the card) when matplotlib is installed.

        ``results``: evaluation results for the card's ``model-index`` (``huggingface_hub.EvalResult`` or
        dicts of its fields; see :func:`optimum_msp.integrations.model_card.perplexity_result`).

        ``compact=True`` stores pruned layers as kept values + bitmask / N:M indices (those layers take 0.5625x
        their dense size at 50 % in bf16, 0.3125x at 75 %; unpruned tensors are stored as is);
        ``compact="deflate"`` also deflates those tensors losslessly (smaller still, slower to save). Loading
        either needs ``optimum_msp`` imported. See :mod:`optimum_msp.integrations.compact`.
        """
        from .integrations.compact import save_pruned

        with atomic_directory(save_directory) as staging:
            save_pruned(self.model, staging, compact=compact, **kwargs)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(staging)
            if self.config is not None:
                self.config.save_pretrained(staging)
            if self.plan is not None:
                base_model = getattr(self.model.config, "_name_or_path", None) or None
                figure = _write_plot(self.plan, Path(staging)) if plot else None
                build_model_card(self.plan, base_model, results, plot_path=figure).save(Path(staging) / "README.md")
        return Path(save_directory)

    def push_to_hub(self, repo_id: str, *, compact: Union[bool, str] = False, results: Iterable[Any] = (),
                    token: Optional[str] = None, endpoint: Optional[str] = None, private: Optional[bool] = None,
                    exist_ok: bool = False, commit_message: Optional[str] = None, revision: Optional[str] = None):
        """Save (weights, config with plan, tokenizer, model card) and upload it as one commit.

        ``token``/``endpoint`` default to ``HF_TOKEN``/``HF_ENDPOINT``; errors the user can fix raise
        :class:`optimum_msp.integrations.hub.HubError` subclasses. Returns the commit info.
        """
        from .integrations.hub import push_to_hub

        with tempfile.TemporaryDirectory(prefix="optimum-msp-push-") as folder:
            saved = self.save_pretrained(Path(folder) / "model", compact=compact, results=results)
            message = commit_message or (
                f"Upload {self.plan.method}/{self.plan.allocation} pruned model "
                f"({self.plan.target_sparsity:g} sparsity)"
                if self.plan else "Upload model"
            )
            return push_to_hub(saved, repo_id, token=token, endpoint=endpoint, private=private, exist_ok=exist_ok,
                               commit_message=message, revision=revision)


def _write_plot(plan: SparsityPlan, folder: Path) -> Optional[str]:
    """The plan's figure in ``folder`` (its file name), or ``None``: a figure is a nicety and never fails a save."""
    from .plotting import PLOT_FILENAME, plot_available, plot_plan

    if not plot_available():
        logger.info("matplotlib is not installed: saving without the allocation figure (pip install matplotlib).")
        return None
    try:
        plot_plan(plan, folder / PLOT_FILENAME)
    except Exception as error:  # noqa: BLE001 - e.g. a hand-edited plan with odd search data
        logger.warning("Could not draw the sparsity plan (%s); saving without the figure.", error)
        return None
    return PLOT_FILENAME

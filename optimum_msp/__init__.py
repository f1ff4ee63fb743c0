"""optimum-msp: Mixed Sparsity Pruning for large language models."""

import logging

from .configuration import MSPConfig
from .plan import LayerTarget, PlanError, SparsityPlan
from .pruner import MSPPruner
from .integrations import transformers as _transformers_integration  # noqa: F401  (registers "msp")

logging.getLogger(__name__).addHandler(logging.NullHandler())

from .version import __version__  # noqa: E402
__all__ = ["LayerTarget", "MSPConfig", "MSPPruner", "PlanError", "SparsityPlan", "SparsityPreservingCallback"]


def __getattr__(name):
    # The Trainer callback pulls in transformers' Trainer machinery: loaded on first use, not at import.
    if name == "SparsityPreservingCallback":
        from .integrations.trainer import SparsityPreservingCallback

        return SparsityPreservingCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

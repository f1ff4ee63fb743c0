"""On-disk cache of what allocators measure on the dense model (Fisher traces, input statistics).

Entries are keyed by the model's weights, the calibration token ids and the settings, and written
atomically (a temporary file beside the entry, then a rename) so two processes can share the cache.
Delete ``<cache>/<kind>/`` to drop them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict

import torch
from torch import nn

from ..modeling.offload import read_matrix
from ..utils.paths import cache_dir


def fingerprint(model: nn.Module, layers: Dict[str, nn.Module], ids: torch.Tensor, *settings: object) -> str:
    """A short key for (model weights, layer selection, calibration ids, settings)."""
    digest = hashlib.sha256()
    digest.update(str(getattr(model.config, "_name_or_path", "")).encode())
    digest.update(ids.cpu().numpy().tobytes())
    for name, module in layers.items():
        weight = read_matrix(module).detach()  # offloaded weights: the stored values, not the meta placeholder
        digest.update(name.encode())
        digest.update(f"{weight.double().sum().item():.10e}|{weight.double().abs().sum().item():.10e}".encode())
    for setting in settings:
        digest.update(f"|{setting}".encode())
    return digest.hexdigest()[:24]


def cache_path(kind: str, key: str, suffix: str) -> Path:
    return cache_dir() / kind / f"{key}{suffix}"


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` then rename it to ``path``: readers never see a partial entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise

"""On-disk cache of what allocators measure on the dense model (Fisher traces, input statistics).

An entry is keyed by everything its value depends on:

* the model: a SHA-256 of the bytes of **every** parameter and buffer (names, dtypes and shapes included) and
  of its config (:func:`model_fingerprint`). Two models whose pruned layers match but whose embeddings, norms
  or rotary settings differ get different entries. The path the model was loaded from plays no part;
* the layer selection, the calibration token ids (their bytes, dtype and shape) and the caller's settings
  (kind of statistics, batch size, pruner options, seed plan);
* the library version, so that a change in how a statistic is computed never serves an older result.

Hashing reads every weight once: about 0.3 s per GB of weights with the SHA extensions of current x86 CPUs
(SmolLM2-135M, 0.54 GB in fp32: see docs/reliability.md). It is recomputed at every use rather than
remembered: the library writes weights through ``.data``, which tensor version counters do not see, so no
cheap test tells that a model is still the one hashed.

Entries are written atomically (a temporary file beside the entry, then a rename) so two processes can share
the cache. Delete ``<cache>/<kind>/`` to drop them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import nn

from .. import distributed
from ..modeling.offload import is_offloaded, read_stored
from ..utils.paths import cache_dir
from ..version import __version__

#: config entries that do not change what the model computes (where it came from, what wrote it, its plan)
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "sparsity_plan", "quantization_config",
                         "msp_checkpoint", "_commit_hash"}

class UnhashableModelError(ValueError):
    """Some weights are not in memory (offloaded to disk or on the meta device): they cannot be hashed."""


def _named_tensors(model: nn.Module):
    """Every parameter and buffer with its values: an offloaded one (a meta placeholder on its module) is read
    from where accelerate stores it."""
    modules = dict(model.named_modules())
    for name, tensor in [*model.named_parameters(remove_duplicate=True), *model.named_buffers(remove_duplicate=True)]:
        owner, _, leaf = name.rpartition(".")
        if tensor.device.type == "meta" and is_offloaded(modules[owner]):
            tensor = read_stored(modules[owner], leaf)
        yield name, tensor


def _config_text(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return ""
    values = {key: value for key, value in config.to_dict().items() if key not in _VOLATILE_CONFIG_KEYS}
    return json.dumps(values, sort_keys=True, default=str)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) of every parameter's and buffer's name, dtype, shape and bytes, and of the model's config.

    Offloaded weights are read from where accelerate stores them; :class:`UnhashableModelError` when a tensor is
    on the meta device without any storage behind it.
    """
    digest = hashlib.sha256()
    digest.update(f"config|{_config_text(model)}".encode())
    for name, tensor in _named_tensors(model):
        tensor = tensor.detach()
        if tensor.device.type == "meta":
            raise UnhashableModelError(f"{name} is on the meta device with no storage behind it: cannot be hashed.")
        digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        data = tensor.cpu().contiguous().reshape(-1)
        if data.numel():
            # a uint8 view of the storage: hashed without a copy (numpy has no bfloat16, bytes do not care)
            digest.update(memoryview(data.view(torch.uint8).numpy()))
    return digest.hexdigest()


def ids_fingerprint(ids: Optional[torch.Tensor]) -> str:
    """SHA-256 (hex) of token ids: their dtype, shape and bytes (``"none"`` for ``None``)."""
    if ids is None:
        return "none"
    data = ids.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}|{tuple(data.shape)}|".encode())
    digest.update(data.reshape(-1).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(model: nn.Module, layers: Dict[str, nn.Module], ids: torch.Tensor, *settings: object) -> str:
    """A key for (the whole model, layer selection, calibration ids, settings, library version)."""
    digest = hashlib.sha256()
    digest.update(f"optimum-msp {__version__}|model {model_fingerprint(model)}|ids {ids_fingerprint(ids)}".encode())
    for name in layers:
        digest.update(f"|layer {name}".encode())
    for setting in settings:
        digest.update(f"|{setting}".encode())
    return digest.hexdigest()[:32]


def cache_path(kind: str, key: str, suffix: str) -> Path:
    return cache_dir() / kind / f"{key}{suffix}"


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` then rename it to ``path``: readers never see a partial entry. Under several processes
    only the main one writes (every process computed the same value)."""
    if not distributed.is_main_process():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise

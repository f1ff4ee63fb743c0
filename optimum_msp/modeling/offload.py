"""Reading and writing layer weights wherever they live, and running one block at a time on a compute device.

A model may hold its weights in three places: on the device its modules sit on (the usual case); in host
memory with the module's parameter on the ``meta`` device (accelerate CPU offload); or in files on disk
(accelerate disk offload, or transformers' ``device_map={..: "disk"}``, which reads them from the checkpoint's
safetensors files or the offload folder). In the last two cases ``module.weight`` is an empty placeholder and
accelerate's hook loads the real values for each forward, so a write to ``module.weight.data`` would be lost.
Every stage of the library therefore reads and writes weights through :func:`read_matrix` and
:func:`write_matrix`, which go to the storage accelerate reads from (its weights map): a pruned weight written
here is what every later forward, the plan's verification and ``save_pretrained`` see.

Disk-offloaded weights are written as ``.dat`` files in the loader's offload folder (``offload_folder=`` of
``from_pretrained``), accelerate's own format, through :func:`accelerate.utils.offload_weight`; the checkpoint
files the model was loaded from are never modified.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from accelerate.utils import has_offloaded_params, offload_weight
from accelerate.utils.offload import OffloadedWeightsLoader
from torch import nn

from .blocks import LINEAR_TYPES

__all__ = ["block_devices", "compute_device", "execution_device", "is_offloaded", "matrix_shape", "onloaded",
           "read_matrix", "read_stored", "write_matrix"]


def is_offloaded(module: nn.Module) -> bool:
    """The module's own parameters live in accelerate's weights map (host memory or disk), not on the module."""
    return has_offloaded_params(module)


def _transposed(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES[1:])  # GPT-2's Conv1D stores [in, out]


def matrix_shape(module: nn.Module) -> Tuple[int, int]:
    """``(out_features, in_features)`` of the weight :func:`read_matrix` returns, without reading it (an offloaded
    weight's placeholder has the shape)."""
    rows, cols = module.weight.shape
    return (cols, rows) if _transposed(module) else (rows, cols)


def read_stored(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The parameter ``name`` of ``module`` as stored (real values, not a meta placeholder), without a copy where
    it lives in memory. Offloaded weights come back on the host."""
    if is_offloaded(module):
        return module._hf_hook.weights_map[name]
    return getattr(module, name).data


def read_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]``; a view of the storage where it lives in memory."""
    weight = read_stored(module)
    return weight.t() if _transposed(module) else weight


@torch.no_grad()
def write_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write an ``[out, in]`` weight into ``module``'s storage, in the storage's dtype and place."""
    stored = matrix.t() if _transposed(module) else matrix
    if not is_offloaded(module):
        module.weight.data.copy_(stored)
        return
    weights_map = module._hf_hook.weights_map
    key = weights_map.prefix + "weight"
    dataset = weights_map.dataset
    if isinstance(dataset, OffloadedWeightsLoader) and key not in dataset.state_dict:
        if dataset.save_folder is None:
            raise ValueError(
                f"Layer {key[: -len('.weight')]!r} is offloaded to disk without an offload folder to write its pruned "
                "weights to: load the model with offload_folder= (a writable folder)."
            )
        current = dataset[key]
        # accelerate's own format: a .dat file in the offload folder; the index entry now points to it
        offload_weight(stored.detach().to("cpu", current.dtype).contiguous(), key, dataset.save_folder,
                       index=dataset.index)
        return
    target = dataset[key]  # host memory (CPU offload): the tensor every forward copies from
    target.copy_(stored.to(target.device, target.dtype))


def _hook_device(module: nn.Module) -> Optional[torch.device]:
    """The execution device of accelerate's hook on ``module`` itself (one of a ``SequentialHook``'s), if any."""
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        if getattr(one, "execution_device", None) is not None:
            return torch.device(one.execution_device)
    return None


def execution_device(module: nn.Module) -> Optional[torch.device]:
    """Where ``module`` computes when left where it is: the execution device of accelerate's hook on it or on its
    first submodule with one (a ``device_map`` puts one on every module it names), else the device of its first
    parameter held in memory; ``None`` when it has neither."""
    for sub in module.modules():
        device = _hook_device(sub)
        if device is not None:
            return device
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return None


def compute_device(model: nn.Module, device: Union[str, torch.device, None] = None) -> torch.device:
    """Where blocks are computed: ``device`` if given, else where accelerate executes offloaded modules, else
    the device of the model's first real parameter."""
    if device is not None:
        return torch.device(device)
    return execution_device(model) or torch.device("cpu")


def block_devices(blocks: Sequence[nn.Module], default: torch.device, given: bool = False) -> List[torch.device]:
    """Where each block is computed. ``default`` for every block when it was ``given`` (``device=``: every block is
    onloaded there) or when the blocks sit on at most one accelerator (on the host, on one GPU, offloaded to one
    execution device); when they sit on several (a ``device_map`` spreading them over GPUs), each block on its own
    (:func:`execution_device`), where its weights already are, and a block on the host on ``default``."""
    if given:
        return [default] * len(blocks)
    own = [execution_device(block) for block in blocks]
    accelerators = {device for device in own if device is not None and device.type not in ("cpu", "meta")}
    if len(accelerators) < 2:
        return [default] * len(blocks)
    return [device if device in accelerators else default for device in own]


@contextlib.contextmanager
def onloaded(block: nn.Module, device: Optional[torch.device]) -> Iterator[nn.Module]:
    """Run ``block`` on ``device`` inside the context: as optimum's GPTQ does, a block held elsewhere (on the host
    while the compute device is a GPU) is moved there and back. Offloaded blocks are left to accelerate's hooks,
    which load their weights for each forward onto their execution device."""
    if device is None or any(is_offloaded(m) for m in block.modules()):
        yield block
        return
    places = {p.device for p in block.parameters()} | {b.device for b in block.buffers()}
    if places <= {torch.device(device)} or len(places) != 1:
        yield block  # already there, or spread over devices by a device_map: leave it as it is
        return
    (home,) = places
    block.to(device)
    try:
        yield block
    finally:
        block.to(home)

"""Data-parallel runs over several processes: ``accelerate launch --num_processes N optimum-msp prune ...`` or
``torchrun --nproc_per_node N ...`` (gloo on CPU, NCCL on GPUs), on ``torch.distributed``, set up by accelerate's
:class:`~accelerate.PartialState`.

Every process loads the model and the same calibration windows, then computes on its **share** of them (contiguous,
balanced slices: :func:`shard`); what it measured is summed over processes (:func:`all_reduce_`,
:func:`reduce_values`, :func:`reduce_statistics`), so every process holds the same Fisher traces and input
statistics as a one-process run, up to floating-point summation order, and prunes and searches identically. The
per-layer work is split too: the MSP search's candidates (:func:`split_work`, :func:`gather_values`) and each block's
layers in the final prune (:func:`assign`, then :func:`broadcast` of the pruned weights: see
:func:`optimum_msp.apply.prune_block`). Only the main process writes (checkpoint, report, caches, search checkpoint).

One process (no launcher: ``WORLD_SIZE`` unset or 1, no process group) is the plain case: no process group is made,
:func:`shard` returns its argument and every reduction returns at once.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
from typing import Any, Dict, Iterator, List, Optional, TypeVar, Union

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["all_reduce_", "all_true", "assign", "barrier", "backend", "broadcast", "describe_shares",
           "is_main_process", "main_process_first", "process_device", "rank", "reduce_statistics", "reduce_values",
           "share", "shard", "world_size"]

T = TypeVar("T")


def _launched_world_size() -> int:
    """The world size a launcher announced (torchrun and ``accelerate launch`` both set ``WORLD_SIZE``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes.") from None


def _initialised() -> bool:
    """Whether a process group of more than one process is up, making one when a launcher asked for it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if _launched_world_size() <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={_launched_world_size()} but this PyTorch build has no torch.distributed: "
                           "run one process, or install a PyTorch with distributed support.")
    from accelerate import PartialState

    # CPU: gloo, named explicitly (accelerate would pick MPI where torch has it); GPUs: NCCL, accelerate's choice.
    # PartialState also binds this process to its GPU (LOCAL_RANK) before the group is made.
    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=cpu, **({"backend": "gloo"} if cpu else {}))
    if not dist.is_initialized():  # pragma: no cover - accelerate declined (e.g. an unknown accelerator)
        raise RuntimeError(f"WORLD_SIZE={_launched_world_size()} but accelerate set up no process group ({state!r}).")
    atexit.register(_destroy)  # the group this module made is torn down cleanly (NCCL warns otherwise)
    if dist.get_rank() != 0:
        # one progress bar for the run, not one per process
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    return dist.get_world_size() > 1


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Processes in the run (1 without a launcher)."""
    return dist.get_world_size() if _initialised() else 1


def rank() -> int:
    """This process's index in the run (0 without a launcher)."""
    return dist.get_rank() if _initialised() else 0


def is_main_process() -> bool:
    """Whether this process writes what the run produces (rank 0)."""
    return rank() == 0


def backend() -> Optional[str]:
    """The process group's backend (``"gloo"``, ``"nccl"``), ``None`` for one process."""
    return str(dist.get_backend()) if _initialised() else None


def process_device(device: Union[str, torch.device, None]) -> Union[str, torch.device, None]:
    """Where this process computes: under several processes on GPUs (NCCL), a bare ``"cuda"`` or no device at all
    means this process's own GPU (``LOCAL_RANK``), so N processes on one node use N GPUs; anything else, and any
    one-process run, is returned unchanged."""
    if not _initialised() or "nccl" not in backend():
        return device
    if device is None or torch.device(device) == torch.device("cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    return device


def share(count: int, processes: Optional[int] = None) -> List[int]:
    """How many of ``count`` items each process takes: balanced, the first ``count % processes`` take one more."""
    processes = world_size() if processes is None else processes
    base, extra = divmod(count, processes)
    return [base + (1 if index < extra else 0) for index in range(processes)]


def shard(items: T, what: str = "calibration windows", allow_empty: bool = False,
          processes: Optional[int] = None, index: Optional[int] = None) -> T:
    """This process's contiguous slice of ``items`` (a tensor's first dimension, or a sequence), the same on every
    call: over all processes, every item exactly once, in order. ``items`` itself for one process or ``None``.

    Statistics need every process to compute something, so an empty share is an error naming ``what``, unless
    ``allow_empty`` (a sum over no items is zero: the Fisher traces). ``processes``/``index`` default to the run's.
    """
    processes = world_size() if processes is None else processes
    if items is None or processes == 1:
        return items
    index = rank() if index is None else index
    counts = share(len(items), processes)
    if not allow_empty and min(counts) == 0:
        raise ValueError(f"{len(items)} {what} cannot be split across {processes} processes (each needs at least "
                         f"one): use at least {processes} (num_calibration_samples), or fewer processes.")
    start = sum(counts[:index])
    return items[start : start + counts[index]]


def describe_shares(counts: Dict[str, int]) -> str:
    """One log line: the number of processes, the backend and each process's share of every kind of item
    (``{"calibration windows": 128, ...}``); raises now, before any work, if a share of calibration windows would
    be empty."""
    processes = world_size()
    parts = []
    for what, count in counts.items():
        if what == "calibration windows":
            shard(range(count), what, processes=processes, index=0)  # the empty-share error, before hours of work
        parts.append(f"{what} per process {share(count, processes)}")
    return f"Data-parallel run on {processes} processes ({backend()}): " + "; ".join(parts)


def _collective_device(tensor: torch.Tensor) -> torch.device:
    """Where ``tensor`` must be for the backend: NCCL reduces GPU tensors only, gloo host tensors."""
    if "nccl" in backend():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensor: torch.Tensor, op: "dist.ReduceOp" = None) -> torch.Tensor:
    """Sum ``tensor`` over processes, in place (moved to where the backend reduces and back when it lives elsewhere,
    e.g. a host tensor under NCCL); returns it. One process: returned untouched."""
    if not _initialised():
        return tensor
    op = dist.ReduceOp.SUM if op is None else op
    device = _collective_device(tensor)
    if tensor.device == device and tensor.is_contiguous():
        dist.all_reduce(tensor, op=op)
        return tensor
    staged = tensor.to(device).contiguous()
    dist.all_reduce(staged, op=op)
    tensor.copy_(staged)
    return tensor


def broadcast(tensor: torch.Tensor, source: int) -> torch.Tensor:
    """Process ``source``'s ``tensor`` on every process, bit for bit (sent as bytes, whatever its dtype and the
    backend): ``source`` gets its own ``tensor`` back, every other process passes a tensor of the same shape and dtype
    (its values unused) and gets a new one, where that one lives. Every process must call it, in the same order.
    One process: ``tensor``."""
    if not _initialised():
        return tensor
    device = _collective_device(tensor)
    if rank() == source:
        staged = tensor.to(device).contiguous()
    else:
        staged = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    dist.broadcast(staged.view(-1).view(torch.uint8), src=source)
    return tensor if rank() == source else staged.to(tensor.device)


def assign(costs: List[float], processes: Optional[int] = None) -> List[int]:
    """The process that works on each item of ``costs`` (its estimated work): the largest first, each to the process
    with the least work so far (ties: the lower index). It depends on the costs alone, so every process computes the
    same assignment without a word exchanged. All 0 for one process."""
    processes = world_size() if processes is None else processes
    owners = [0] * len(costs)
    if processes == 1:
        return owners
    loads = [0.0] * processes
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner = min(range(processes), key=lambda p: (loads[p], p))
        owners[item] = owner
        loads[owner] += costs[item]
    return owners


def reduce_values(values: Dict[str, float]) -> Dict[str, float]:
    """Per-key sums of Python numbers over processes (in float64), keys in ``values``' order. Every process must
    pass the same keys. One process: ``values`` itself."""
    if not _initialised():
        return values
    names = sorted(values)  # one order on every process, whatever order each built its dict in
    summed = all_reduce_(torch.tensor([float(values[name]) for name in names], dtype=torch.float64)).tolist()
    by_name = dict(zip(names, summed))
    return {name: by_name[name] for name in values}


def split_work(count: int, keys: Optional[List[Any]] = None) -> List[int]:
    """The indices of ``count`` items this process works on: a balanced contiguous share of the items sorted by
    ``keys`` (items with similar keys, e.g. genomes sharing a prefix, land on one process). All: one process."""
    if not _initialised():
        return list(range(count))
    order = sorted(range(count), key=lambda i: keys[i]) if keys is not None else list(range(count))
    counts = share(count)
    start = sum(counts[: rank()])
    return order[start : start + counts[rank()]]


def gather_values(count: int, indices: List[int], values: List[float]) -> List[float]:
    """Every process's ``values`` (of the items at ``indices`` out of ``count``, see :func:`split_work`) in item
    order, on every process. One process: ``values`` put in item order."""
    merged = torch.zeros(count, dtype=torch.float64)
    for index, value in zip(indices, values):
        merged[index] = value
    if _initialised():
        all_reduce_(merged)  # each item is filled on exactly one process, zero elsewhere
    return merged.tolist()


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every process: a decision every process must take alike (e.g. whether a cache
    entry is read or recomputed; a process recomputing alone would wait forever in a reduction)."""
    if not _initialised():
        return bool(flag)
    return bool(all_reduce_(torch.tensor([int(bool(flag))], dtype=torch.int64), dist.ReduceOp.MIN).item())


def reduce_statistics(stats: Dict[str, object]) -> None:
    """Sum accumulated input statistics (layer name -> statistic, see :mod:`optimum_msp.statistics`) over processes,
    in place: every tensor named in a statistic's ``STATE`` and its ``tokens``. Layers sharing one accumulator are
    reduced once. Every process must hold statistics for the same layers. One process: nothing happens."""
    if not _initialised():
        return
    distinct: Dict[int, object] = {}
    slots: Dict[int, int] = {}
    layout = []  # what every process must agree on: the layers, which share an accumulator, the tensors' shapes
    for name in sorted(stats):  # one order on every process
        stat = stats[name]
        if not getattr(stat, "STATE", None):
            raise TypeError(f"The statistics of {name} ({type(stat).__name__}) name no STATE tensors, so they cannot be "
                            "summed over processes: give the class a STATE tuple (see optimum_msp.statistics), or run "
                            "one process.")
        distinct.setdefault(id(stat), stat)
        slot = slots.setdefault(id(stat), len(slots))
        layout.append(f"{name}:{slot}:{[tuple(getattr(stat, field).shape) for field in stat.STATE]}")
    _check_same_everywhere("|".join(layout), f"input statistics of the layers {sorted(stats)[:3]}...", "the layers "
                           "that received calibration inputs differ between processes (e.g. an expert no token of one "
                           "process's windows was routed to): use more calibration windows, or one process")
    for stat in distinct.values():
        for field in stat.STATE:
            all_reduce_(getattr(stat, field))
    tokens = all_reduce_(torch.tensor([stat.tokens for stat in distinct.values()], dtype=torch.int64)).tolist()
    for stat, count in zip(distinct.values(), tokens):
        stat.tokens = int(count)


def _check_same_everywhere(text: str, what: str, why: str) -> None:
    """Raise on every process unless ``text`` is the same on all of them: reducing different things would pair
    unrelated tensors, or wait forever. One small reduction (the max of a digest and of its negation)."""
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")
    extremes = all_reduce_(torch.tensor([digest, -digest], dtype=torch.int64), dist.ReduceOp.MAX).tolist()
    if extremes[0] != -extremes[1]:
        raise RuntimeError(f"Processes disagree on the {what}: {why}.")


def barrier() -> None:
    """Wait until every process gets here (nothing for one process)."""
    if _initialised():
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block first (e.g. to fill a cache), the others after it is done (and read what it
    wrote). Every process must enter it. One process: just the block."""
    main = is_main_process()
    if not main:
        barrier()
    try:
        yield
    finally:
        if main:
            barrier()


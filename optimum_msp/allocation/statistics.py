"""Input statistics for allocators (OWL's outlier ratios, the MSP search's weight bank): of the dense model,
or gathered by a sequential prune with a seed plan (inputs from pruned blocks, as the final prune sees them).

Memory: they are written to disk block by block as they are gathered and read back one block at a time
(:class:`StatisticsStore`), so holding them costs one block's statistics, whatever the depth. A SparseGPT
store for SmolLM2-135M is ~0.4 GB on disk (one fp32 Hessian per distinct input); for LLaMA-2-7B ~10 GB.

Gathering them costs one forward pass over the calibration windows (dense) or the two passes of a uniform prune
(seeded), and they depend only on the model's weights, the calibration windows, the kind of statistics (Wanda's
input norms, SparseGPT's Hessians) and the seed plan. Like the Fisher traces they are cached: the store's folder
*is* the cache entry, so trying other search settings, targets or allocations on the same model and data skips
those passes. When the model cannot be fingerprinted the store lives in a temporary folder, removed once the store
is closed or dropped. Layers that read the same input share one accumulator, in memory and on disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

from safetensors import safe_open
from safetensors.torch import save_file

from .. import distributed
from ..apply import apply_targets, dense_statistics
from ..checks import check_all_statistics
from .base import Allocation, AllocationContext
from .cache import UnhashableModelError, cache_path, fingerprint

logger = logging.getLogger(__name__)

_INDEX = "index.json"


class StatisticsStore(Mapping):
    """Layer name -> input statistic, read from a folder of one safetensors file per block, one block in memory.

    Reading a layer loads its whole block (layers sharing an input share one object, as when they were gathered)
    and drops the block read before, so the MSP search's bank, which works block by block, holds one block's
    Hessians at a time.
    """

    def __init__(self, folder: Path, make_stats: Callable[[int], Any], temporary: bool = False):
        self.folder = Path(folder)
        self.make_stats = make_stats
        index = json.loads((self.folder / _INDEX).read_text())
        self._block_of: Dict[str, int] = {name: int(block) for name, block in index["layers"].items()}
        self._loaded: Optional[int] = None
        self._stats: Dict[str, Any] = {}
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.folder), True) if temporary else None

    # --------------------------------------------------------------------------------------------- Mapping
    def __getitem__(self, name: str) -> Any:
        block = self._block_of[name]
        if self._loaded != block:
            self._stats = {}  # the block read before goes first: one block's statistics alive
            self._stats = _load_block(self.folder / _block_file(block), self.make_stats)
            check_all_statistics(self._stats)
            self._loaded = block
        return self._stats[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._block_of)

    def __len__(self) -> int:
        return len(self._block_of)

    # ----------------------------------------------------------------------------------------------- other
    def block(self, name: str) -> int:
        return self._block_of[name]

    def nbytes_on_disk(self) -> int:
        return sum(path.stat().st_size for path in self.folder.glob("*.safetensors"))

    def validate(self, layers) -> None:
        """Raise if the store does not hold exactly ``layers`` or a block file is unreadable (headers only)."""
        if set(self._block_of) != set(layers):
            raise ValueError("the entry was written for other layers")
        for block in sorted(set(self._block_of.values())):
            with safe_open(str(self.folder / _block_file(block)), framework="pt") as handle:
                handle.metadata()

    def close(self) -> None:
        """Drop what is loaded; a temporary store's folder is removed."""
        self._stats, self._loaded = {}, None
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> "StatisticsStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _StoreWriter:
    """Receives one block's statistics at a time (``add``), checks and writes them, and forgets them."""

    def __init__(self, folder: Path, block_of: Dict[str, int]):
        self.folder = folder
        self.block_of = block_of
        self.layers: Dict[str, int] = {}

    def add(self, stats: Dict[str, Any]) -> None:
        if not stats:
            return
        # NaN/inf statistics would make OWL's outlier ratios and the search's bank meaningless; never store them
        check_all_statistics(stats)
        blocks = {self.block_of[name] for name in stats}
        if len(blocks) != 1:
            raise ValueError(f"statistics of several blocks at once: {sorted(blocks)}")
        (block,) = blocks
        _save_block(stats, self.folder / _block_file(block))
        self.layers.update({name: block for name in stats})

    def finish(self) -> None:
        (self.folder / _INDEX).write_text(json.dumps({"layers": self.layers}))


def _block_file(block: int) -> str:
    return f"block-{block:05d}.safetensors"


def dense_layer_statistics(
    context: AllocationContext, make_stats: Callable[[int], Any], desc: str = "Dense statistics",
    use_cache: bool = True, work_dir: Optional[str] = None,
) -> Mapping:
    """Input statistics of every layer of ``context.layers`` on the dense model, from the cache if possible
    (a :class:`StatisticsStore`; a plain dict for statistics without a ``STATE`` to store)."""

    def compute(add: Callable[[Dict[str, Any]], None]) -> None:
        for _index, block_stats in dense_statistics(context.runner, context.layers, context.calibration.ids,
                                                    make_stats, context.batch_size, desc=desc):
            add(block_stats)

    return _stored(context, make_stats, (), compute, use_cache, work_dir)


def seeded_layer_statistics(
    context: AllocationContext, targets: Allocation, use_cache: bool = True, work_dir: Optional[str] = None,
) -> Mapping:
    """Input statistics gathered as a sequential prune with ``targets`` (by ``context.pruner``) gathers them:
    each block's inputs come from the blocks before it *pruned to those targets*, not from the dense model.

    Each block is pruned only for the pass that gives the next block its inputs, then restored: the model is
    dense afterwards, and the copy kept to restore it is one block's weights.
    """
    pruner = context.pruner

    def compute(add: Callable[[Dict[str, Any]], None]) -> None:
        logger.info("Search statistics: a sequential %s prune with the seed plan (each block restored after it ran)",
                    pruner.name)
        apply_targets(context.runner, context.layers, targets, pruner, context.calibration.ids,
                      context.batch_size, on_statistics=add, restore=True)

    plan = sorted((name, target.describe()) for name, target in targets.items())
    # the pruner's options change the prune, hence the statistics downstream of it
    settings = ("seeded", pruner.name, repr(pruner.options), plan)
    return _stored(context, pruner.new_statistics, settings, compute, use_cache, work_dir)


def _stored(context: AllocationContext, make_stats: Callable[[int], Any], settings: tuple,
            compute: Callable[[Callable[[Dict[str, Any]], None]], None], use_cache: bool,
            work_dir: Optional[str]) -> Mapping:
    ids = context.calibration_ids("Input statistics")
    layers = context.modules
    kind = type(make_stats(1)).__name__
    if not hasattr(make_stats(1), "STATE"):  # a statistic that cannot say what to store: kept in memory
        stats: Dict[str, Any] = {}
        compute(lambda block_stats: (check_all_statistics(block_stats), stats.update(block_stats)))
        return stats
    path = None
    if use_cache:
        try:
            path = cache_path("statistics", fingerprint(context.model, layers, ids, kind, context.batch_size,
                                                        *settings), "")
        except UnhashableModelError as error:
            logger.info("%s are not cached: %s", kind, error)
            use_cache = False
    # every process takes the same decision (one reading the cache while another gathers would hang its reductions)
    if use_cache and distributed.all_true((path / _INDEX).is_file()):
        try:
            store = StatisticsStore(path, make_stats)
            store.validate(layers)
            logger.info("%s read from cache %s", kind, path)
            return store
        except Exception as error:  # a damaged entry costs a recomputation, never a failed prune
            logger.warning("Ignoring the unreadable statistics cache %s (%s); recomputing.", path, error)
            shutil.rmtree(path, ignore_errors=True)
    # under several processes only the main one writes the cache entry; the others keep theirs in a work folder
    use_cache = use_cache and distributed.is_main_process()
    parent = path.parent if use_cache else Path(work_dir) if work_dir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".statistics-", dir=parent))
    try:
        block_of = {name: index for index, block in enumerate(context.layers) for name in block}
        writer = _StoreWriter(staging, block_of)
        compute(writer.add)
        writer.finish()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not use_cache:
        return StatisticsStore(staging, make_stats, temporary=True)
    try:
        os.replace(staging, path)  # readers never see a partial entry
    except OSError:  # another process wrote the same entry first: it holds the same values
        shutil.rmtree(staging, ignore_errors=True)
    return StatisticsStore(path, make_stats)


def _save_block(stats: Dict[str, Any], path: Path) -> None:
    slots: Dict[int, int] = {}
    tensors, layers, tokens, widths = {}, {}, {}, {}
    for name, stat in stats.items():
        if id(stat) not in slots:
            slot = slots[id(stat)] = len(slots)
            tokens[slot], widths[slot] = stat.tokens, getattr(stat, stat.STATE[0]).shape[0]
            for field in stat.STATE:
                tensors[f"{slot}.{field}"] = getattr(stat, field).contiguous()
        layers[name] = slots[id(stat)]
    metadata = {"layers": json.dumps(layers), "tokens": json.dumps(tokens), "in_features": json.dumps(widths)}
    save_file(tensors, str(path), metadata=metadata)


def _load_block(path: Path, make_stats: Callable[[int], Any]) -> Dict[str, Any]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    names = json.loads(metadata["layers"])
    tokens, widths = json.loads(metadata["tokens"]), json.loads(metadata["in_features"])
    shared = {}
    for slot, width in widths.items():
        stat = make_stats(width)
        for field in stat.STATE:
            value = tensors[f"{slot}.{field}"]
            expected = getattr(stat, field)
            if value.shape != expected.shape or value.dtype != expected.dtype:
                raise ValueError(f"{field} is {value.dtype}{list(value.shape)}, "
                                 f"expected {expected.dtype}{list(expected.shape)}")
            setattr(stat, field, value)
        stat.tokens = tokens[slot]
        shared[slot] = stat
    return {name: shared[str(slot)] for name, slot in names.items()}

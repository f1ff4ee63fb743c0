"""The block-by-block runner: the only place that moves activations around.

The standard sequential scheme (SparseGPT, Wanda): run the calibration batches up to the first decoder
block and keep its hidden states, plus the other arguments *every* block is called with (attention mask,
position ids/embeddings, cache flags); then for each block, let the caller collect statistics and prune
it, and feed the *pruned* block's outputs to the next one. Only one block's activations are alive at a
time, so the same code serves models offloaded with ``accelerate``.

The arguments are recorded per block because they differ between blocks of different layer types
(``config.layer_types``: Gemma 2/3, Cohere2, GPT-OSS, Qwen2 with ``max_window_layers`` give sliding-window
and full-attention blocks different masks, Gemma 3 also different rotary bases); block 0's arguments
replayed everywhere silently give wrong activations in every block unlike it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from .. import distributed
from .blocks import find_decoder_blocks
from .capture import BlockInputs, Replay, StandIn, capture_block_inputs, swapped_blocks
from .offload import block_devices, compute_device, onloaded

__all__ = ["BlockDone", "BlockInputs", "BlockRunner", "InputStatistics", "StandIn", "advance_with_statistics",
           "batched", "block_output", "forward_with_statistics", "input_device", "swapped_blocks"]

logger = logging.getLogger(__name__)


class BlockDone(Exception):
    """Raised by a hook once a statistics pass has all it needs from a block: the rest of that batch's block
    forward is skipped (its output is not kept anyway)."""


def block_output(output: Any) -> torch.Tensor:
    """Decoder blocks return a tensor (transformers >= 5) or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output


def batched(input_ids: torch.Tensor, batch_size: int) -> List[torch.Tensor]:
    return [input_ids[i : i + batch_size] for i in range(0, input_ids.shape[0], batch_size)]


class BlockRunner:
    """Runs calibration data through a model's decoder blocks, one block at a time, on a compute ``device``.

    The activations live on ``device`` (default: where the model computes); a block held elsewhere (the model on
    the host, a GPU to compute on) is moved there for its forward and back afterwards, and offloaded blocks are
    loaded by accelerate's hooks: one block's weights on the compute device at a time.

    Without a ``device``, blocks that sit on several GPUs (a ``device_map`` spreading them) are each computed where
    they sit (:meth:`block_device`): a block's hidden states and other arguments (masks, position embeddings) are
    moved to it, and its outputs stay there for the next block.
    """

    def __init__(self, model: nn.Module, block_name: Optional[str] = None,
                 device: Optional[torch.device] = None):
        self.model = model
        self.block_prefix, self.blocks = find_decoder_blocks(model, block_name)
        self.device = compute_device(model, device)
        self._block_devices = block_devices(self.blocks, self.device, given=device is not None)
        #: whether blocks are computed on more than one device (then every block call moves its inputs)
        self.spread = len(set(self._block_devices)) > 1
        #: whether a block returns a tuple (older transformers) rather than a tensor; known after a capture
        self.returns_tuple: Optional[bool] = None

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, batch_size: int = 1) -> BlockInputs:
        """Run ``input_ids`` ([samples, seqlen]) through the model, every block replaced by a recording
        pass-through (no block computes anything); keep the first block's hidden states and every block's
        other arguments."""
        batches = [batch.to(input_device(self.model)) for batch in batched(input_ids, batch_size)]
        inputs, self.returns_tuple = capture_block_inputs(self.model, self.blocks, batches, self.returns_tuple)
        return inputs.to(self.block_device(0))

    def block_device(self, index: int) -> torch.device:
        """Where block ``index`` is computed: :attr:`device`, unless the blocks sit on several GPUs (see the class)."""
        return self._block_devices[index]

    @contextlib.contextmanager
    def onloaded(self, index: int) -> Iterator[nn.Module]:
        """Block ``index`` ready to compute on :meth:`block_device` inside the context (see
        :func:`~optimum_msp.modeling.offload.onloaded`): several passes through one block pay for one move."""
        with onloaded(self.blocks[index], self.block_device(index)) as block:
            yield block

    def call(self, block: nn.Module, index: int, inputs: BlockInputs, hidden: torch.Tensor, batch: int) -> Any:
        """The onloaded ``block`` (number ``index``) called on ``hidden`` with its captured arguments of batch
        ``batch``, all on its device (the block's raw output)."""
        if not self.spread:
            args, kwargs = inputs.call_args(index, batch)
            return block(hidden, *args, **kwargs)
        device = self.block_device(index)
        args, kwargs = inputs.call_args(index, batch, device)
        return block(hidden.to(device), *args, **kwargs)

    @torch.no_grad()
    def forward_block(
        self, block: nn.Module, index: int, inputs: BlockInputs, hidden: List[torch.Tensor],
        on_batch: Optional[Callable[[int], None]] = None, keep: bool = True,
        batches: Optional[Sequence[int]] = None,
    ) -> List[torch.Tensor]:
        """Forward ``hidden`` (the batches numbered ``batches``, by default the first ``len(hidden)``) through the
        onloaded ``block`` (number ``index``) with the block's own captured arguments of those batches; return the
        outputs if ``keep``."""
        outputs = []
        for j, batch in enumerate(range(len(hidden)) if batches is None else batches):
            if on_batch is not None:
                on_batch(j)
            try:
                out = block_output(self.call(block, index, inputs, hidden[j], batch))
            except BlockDone:
                if keep:
                    raise
                continue
            if keep:
                outputs.append(out)
        return outputs

    @torch.no_grad()
    def run_block(
        self, index: int, inputs: BlockInputs, on_batch: Optional[Callable[[int], None]] = None, keep: bool = True,
        hidden: Optional[List[torch.Tensor]] = None,
    ) -> List[torch.Tensor]:
        """Forward every batch through block ``index``; return the outputs if ``keep`` (inputs untouched).

        ``hidden`` replaces ``inputs.hidden`` (the same batches or the first of them, other hidden states: the MSP
        fitness replays cached states of a candidate plan with the captured masks and position arguments).
        """
        with self.onloaded(index) as block:
            return self.forward_block(block, index, inputs, inputs.hidden if hidden is None else hidden,
                                      on_batch=on_batch, keep=keep)

    @torch.no_grad()
    def advance(self, index: int, inputs: BlockInputs, on_batch: Optional[Callable[[int], None]] = None) -> None:
        """Replace ``inputs`` in place by what block ``index`` outputs (one block's activations alive)."""
        with self.onloaded(index) as block:
            for j in range(len(inputs)):
                if on_batch is not None:
                    on_batch(j)
                inputs.hidden[j] = block_output(self.call(block, index, inputs, inputs.hidden[j], j))

    def head(self, final_hidden: torch.Tensor, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None):
        """The model's output (logits, and the loss with ``labels``) for a last block's output ``final_hidden``.

        The model's own forward runs with every block replaced by a pass-through and the last one returning
        ``final_hidden``, so the final norm, the head and the loss are the model's, whatever the architecture.
        They run where the model keeps them (the host, when blocks are computed on a GPU); gradients flow back
        to ``final_hidden`` when it requires them.
        """
        home = input_device(self.model)
        replays = [Replay(block, self.returns_tuple) for block in self.blocks]
        replays[-1].output = final_hidden.to(home)
        with swapped_blocks(self.blocks, replays):
            return self.model(input_ids=input_ids.to(home), labels=None if labels is None else labels.to(home),
                              use_cache=False)

    def walk(self, inputs: BlockInputs, desc: str = "Blocks", start: int = 0) -> Iterator[Tuple[int, nn.Module]]:
        """Yield ``(index, block)``; after the caller is done with a block, its outputs become the next inputs."""
        indices = range(start, len(self.blocks))
        for index in hf_logging.tqdm(indices, desc=desc, disable=not hf_logging.is_progress_bar_enabled()):
            yield index, self.blocks[index]
            if index + 1 < len(self.blocks):  # the last block's outputs feed nothing
                self.advance(index, inputs)


def input_device(model: nn.Module) -> torch.device:
    """Where the model takes its input ids: the device of its input embeddings, or where accelerate executes
    them when they are offloaded."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        if embeddings.weight.device.type != "meta":
            return embeddings.weight.device
        hook = getattr(embeddings, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    return compute_device(model)


class InputStatistics:
    """Per-linear statistics hooks with sharing: layers fed the same tensor (q/k/v, gate/up) share one
    accumulator, so e.g. a Hessian is computed once per distinct input instead of once per layer.

    Only inputs are needed, so the hooks run *before* each layer, and once the first batch has shown the order
    in which the layers run, every later batch stops the block right after the last layer's input is seen:
    that layer's matmul and whatever follows it (for LLaMA: ``down_proj`` and the residual, ~15 % of the
    block) are skipped. Only when every layer ran exactly once in the first batch; otherwise (e.g. a mixture
    of experts whose routing varies) every batch runs in full. ``stop_early=False`` never stops a block: for a
    pass whose outputs are kept (:func:`advance_with_statistics`).
    """

    def __init__(self, layers: Dict[str, nn.Module], make_stats: Callable[[int], Any], stop_early: bool = True):
        self.layers = layers
        self.make_stats = make_stats
        self.stop_early = stop_early
        self.stats: Dict[str, Any] = {}
        self._seen: Dict[Tuple, Tuple[torch.Tensor, Any]] = {}
        self._handles: List[Any] = []
        self._order: List[str] = []  # layers in the order they ran in the first batch
        self._last: Optional[str] = None  # once known, the layer whose input completes a batch
        self._batch = 0

    def new_batch(self, index: int) -> None:
        # Held references keep this batch's inputs alive so a freed tensor's address cannot be reused by
        # another layer's input within the batch (which would make two different inputs look shared).
        self._seen.clear()
        self._batch = index
        if index == 1 and self.stop_early and sorted(self._order) == sorted(self.layers):
            self._last = self._order[-1]

    def __enter__(self) -> "InputStatistics":
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def _hook(self, name: str):
        def hook(module, args):
            self._collect(name, args[0].detach())
            if self._batch == 0:
                self._order.append(name)
            elif name == self._last:
                raise BlockDone

        return hook

    def _collect(self, name: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
        if key in self._seen:
            stats = self._seen[key][1]
            self.stats.setdefault(name, stats)
            if self.stats[name] is stats:
                return
        stats = self.stats.get(name)
        if stats is None:
            stats = self.stats[name] = self.make_stats(x.shape[-1])
        stats.add_batch(x.reshape(-1, x.shape[-1]))
        self._seen[key] = (x, stats)


def advance_with_statistics(
    runner: BlockRunner, index: int, inputs: BlockInputs, layers: Dict[str, nn.Module], make_stats
) -> Dict[str, Any]:
    """Replace ``inputs`` by what block ``index`` outputs (:meth:`BlockRunner.advance`) while collecting input
    statistics of ``layers``: when the block is not changed in between (the dense model's statistics), one pass
    does what :func:`forward_with_statistics` and an advance do in almost two."""
    with InputStatistics(layers, make_stats, stop_early=False) as collector:
        runner.advance(index, inputs, on_batch=collector.new_batch)
    distributed.reduce_statistics(collector.stats)  # as forward_with_statistics: complete before any use
    return collector.stats


def forward_with_statistics(
    runner: BlockRunner, index: int, inputs: BlockInputs, layers: Dict[str, nn.Module], make_stats
) -> Dict[str, Any]:
    """One pass through block ``index`` collecting input statistics of ``layers``."""
    with InputStatistics(layers, make_stats) as collector:
        runner.run_block(index, inputs, on_batch=collector.new_batch, keep=False)
    # the one place a block's statistics are complete: under several processes each saw its share of the windows,
    # and every process gets their sum before anything uses them (nothing happens for one process)
    distributed.reduce_statistics(collector.stats)
    return collector.stats

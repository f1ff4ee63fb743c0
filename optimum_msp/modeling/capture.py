"""Capturing what every decoder block is called with, for the block-by-block runner.

One forward of the model per calibration batch, with every block swapped for a recording pass-through
(:class:`StandIn`): the model builds its masks and position embeddings as usual and hands each block its
own, but no block computes anything. The first block's hidden states and each block's other arguments are
kept; the hidden states of later blocks are not (the runner produces them, from pruned blocks).

Per block because blocks of different layer types (``config.layer_types``: sliding-window vs full
attention in Gemma 2/3, Cohere2, GPT-OSS, Qwen2 with ``max_window_layers``) get different masks and, for
Gemma 3, different rotary embeddings.
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the stand-in of the last block to be called: the final norm and head need not run."""


Call = Tuple[Tuple[Any, ...], Dict[str, Any]]  # a block's arguments after the hidden state: (args, kwargs)


@dataclass
class BlockInputs:
    """What enters the decoder blocks, one entry per calibration batch: the first block's hidden states, and
    each block's own other arguments (``calls[batch][block]``; blocks with the same arguments share one
    ``(args, kwargs)`` pair, and equal tensors are stored once)."""

    hidden: List[torch.Tensor] = field(default_factory=list)
    calls: List[List[Call]] = field(default_factory=list)
    #: ``calls`` with their tensors on another device, per device (:meth:`call_args`)
    _placed: Dict[torch.device, List[List[Call]]] = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.hidden)

    def to(self, device: torch.device) -> "BlockInputs":
        """These inputs with every tensor on ``device`` (shared tensors stay shared); ``self`` if all are there."""
        if all(h.device == torch.device(device) for h in self.hidden) and not _has_tensor_off(self.calls, device):
            return self
        move = _mover(device)
        return BlockInputs([move(h) for h in self.hidden], [[move(call) for call in calls] for calls in self.calls])

    def call_args(self, block: int, batch: int, device: Optional[torch.device] = None) -> Call:
        """``(args, kwargs)`` block ``block`` is called with (after its hidden state) in batch ``batch``; with
        ``device``, their tensors there (blocks spread over several GPUs: moved once per device, then kept)."""
        if device is None:
            return self.calls[batch][block]
        placed = self._placed.get(torch.device(device))
        if placed is None:
            if not _has_tensor_off(self.calls, device):
                placed = self.calls
            else:
                move = _mover(device)
                placed = [[move(call) for call in calls] for calls in self.calls]
            self._placed[torch.device(device)] = placed
        return placed[batch][block]

    @property
    def args(self) -> List[Tuple[Any, ...]]:
        """The *first* block's positional arguments per batch; other blocks may differ: use :meth:`call_args`."""
        return [calls[0][0] for calls in self.calls]

    @property
    def kwargs(self) -> List[Dict[str, Any]]:
        """The *first* block's keyword arguments per batch; other blocks may differ: use :meth:`call_args`."""
        return [calls[0][1] for calls in self.calls]


class StandIn(nn.Module):
    """Takes a decoder block's place in its ``ModuleList`` for one forward of the model (capture, replay).

    Attributes it lacks are read from the real block: some model loops read e.g. ``layer.attention_type``.
    The block is not registered as a submodule, so parameters and devices stay the real block's business.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        object.__setattr__(self, "_block", block)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_block")
            if block is None:
                raise
            return getattr(block, name)


class Replay(StandIn):
    """Stands in for a decoder block: returns its input unchanged, or ``output`` when set (the last block's
    output of a computed or cached pass), in the format the real block returns."""

    def __init__(self, block: nn.Module, as_tuple: Optional[bool], output: Optional[torch.Tensor] = None):
        super().__init__(block)
        self.as_tuple = bool(as_tuple)
        self.output = output

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.output is None else self.output
        return (out,) if self.as_tuple else out


@contextmanager
def swapped_blocks(blocks: nn.ModuleList, stand_ins: Sequence[nn.Module]):
    """Put ``stand_ins`` in place of ``blocks`` for the duration; the real blocks always come back."""
    originals = list(blocks)
    try:
        for i, module in enumerate(stand_ins):
            blocks[i] = module
        yield
    finally:
        for i, module in enumerate(originals):
            blocks[i] = module


class _Recording(StandIn):
    """Records the call and hands the hidden state on unchanged, in the real block's return format."""

    def __init__(self, recorder: "_CaptureRecorder", index: int, block: nn.Module):
        super().__init__(block)
        object.__setattr__(self, "_recorder", recorder)
        self.index = index

    def forward(self, *args, **kwargs):
        if args:
            hidden, args = args[0], args[1:]
        else:
            hidden = kwargs.pop("hidden_states")
        return self._recorder.record(self.index, hidden, args, kwargs)


class _CaptureRecorder:
    """Collects one capture: block 0's hidden states and every block's other arguments, per batch.

    Memory: the model usually passes blocks of one type the very same mask and position tensors, which are
    then just referenced again; tensors equal to a recently stored one (a mask rebuilt per layer, the same
    positions in every batch) are replaced by it, so each distinct value is held once.
    """

    _RECENT = 8  # stored tensors compared per shape: bounds the cost when every batch differs (padding)

    def __init__(self, blocks: nn.ModuleList, returns_tuple: Optional[bool]):
        self.blocks = blocks
        self.returns_tuple = returns_tuple
        self.inputs = BlockInputs()
        self._calls: Dict[int, Call] = {}
        self._distinct: List[Call] = []  # this batch's distinct calls, which blocks then share
        self._closed = True
        self._seen: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor, stored) in this batch
        self._stored: Dict[Tuple, Deque[torch.Tensor]] = {}

    def new_batch(self) -> None:
        self._calls, self._distinct, self._closed = {}, [], False
        self._seen.clear()  # held the batch's tensors alive, so their ids were unique; a new batch reuses ids

    def record(self, index: int, hidden: torch.Tensor, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
        if index not in self._calls:  # a block called twice (weights shared across steps) keeps its first call
            call = (self._intern(tuple(args)), self._intern(dict(kwargs)))
            same = next((c for c in self._distinct if _same(c, call)), None)
            if same is None:
                self._distinct.append(call)
            self._calls[index] = call if same is None else same
            if index == 0:
                self.inputs.hidden.append(hidden.detach())
                if self.returns_tuple is None:  # ask the real block once what the model's loop expects
                    output = self.blocks[0](hidden, *args, **kwargs)
                    self.returns_tuple = isinstance(output, (tuple, list))
        if len(self._calls) == len(self.blocks):
            self.end_batch()
            raise _StopForward  # every block seen: the final norm and head need not run
        return (hidden,) if self.returns_tuple else hidden

    def end_batch(self) -> None:
        if self._closed:
            return
        self._closed = True
        if 0 not in self._calls:
            raise RuntimeError("The first decoder block was never called: cannot capture its inputs.")
        missing = [i for i in range(len(self.blocks)) if i not in self._calls]
        if missing and not self.inputs.calls:
            logger.warning("Decoder blocks %s were not called by the model's forward; they are run with the "
                           "arguments of the nearest earlier block.", missing)
        calls: List[Call] = []
        for i in range(len(self.blocks)):
            calls.append(self._calls.get(i, calls[-1] if calls else None))
        self.inputs.calls.append(calls)

    def _intern(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self._tensor(value)
        if type(value) in (tuple, list):
            return type(value)(self._intern(v) for v in value)
        if type(value) is dict:
            return {k: self._intern(v) for k, v in value.items()}
        return value  # cache objects, flags, None: kept as given

    def _tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        seen = self._seen.get(id(tensor))
        if seen is not None:
            return seen[1]
        stored = tensor
        if tensor.device.type != "meta":
            signature = (tuple(tensor.shape), tensor.dtype, tensor.device)
            recent = self._stored.setdefault(signature, deque(maxlen=self._RECENT))
            stored = next((t for t in recent if torch.equal(t, tensor)), None)
            if stored is None:
                stored = tensor
                recent.append(tensor)
        self._seen[id(tensor)] = (tensor, stored)
        return stored


def _mover(device: torch.device):
    """A function moving a structure's tensors to ``device``; a value met twice (shared) is moved once."""
    moved: Dict[int, Any] = {}

    def move(value: Any) -> Any:
        if id(value) in moved:
            return moved[id(value)]
        if isinstance(value, torch.Tensor):
            result = value.to(device)
        elif isinstance(value, (tuple, list)):
            result = type(value)(move(v) for v in value)
        elif type(value) is dict:
            result = {k: move(v) for k, v in value.items()}
        else:
            result = value
        moved[id(value)] = result
        return result

    return move


def _has_tensor_off(value: Any, device: torch.device) -> bool:
    if isinstance(value, torch.Tensor):
        return value.device != torch.device(device)
    if isinstance(value, (tuple, list)):
        return any(_has_tensor_off(v, device) for v in value)
    if type(value) is dict:
        return any(_has_tensor_off(v, device) for v in value.values())
    return False


def _same(a: Any, b: Any) -> bool:
    """Identical structure with identical (``is``) tensors: two blocks called the same way."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if type(a) is not type(b):
        return False
    if type(a) in (tuple, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a is b or a == b)
    except Exception:  # objects whose == is not a plain bool
        return False


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: Sequence[torch.Tensor], returns_tuple: Optional[bool] = None
) -> Tuple[BlockInputs, bool]:
    """``(inputs, returns_tuple)`` for ``batches`` of input ids (already on the model's input device).

    ``returns_tuple``: whether the blocks return a tuple (older transformers) rather than a tensor, which is
    what the stand-ins must hand the model's loop; ``None`` asks the real first block once.
    """
    recorder = _CaptureRecorder(blocks, returns_tuple)
    with swapped_blocks(blocks, [_Recording(recorder, i, block) for i, block in enumerate(blocks)]):
        for batch in batches:
            recorder.new_batch()
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
            recorder.end_batch()
    if len(recorder.inputs) == 0:
        raise RuntimeError("The first decoder block was never called: cannot capture its inputs.")
    return recorder.inputs, bool(recorder.returns_tuple)

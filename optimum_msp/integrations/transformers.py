"""``transformers`` integration: prune while loading, and verify (and decompress) pruned checkpoints on load.

Importing :mod:`optimum_msp` registers the quantization method ``"msp"`` with transformers' quantizer
registry (a config class and an :class:`~transformers.quantizers.HfQuantizer`). That gives two hooks into
``AutoModelForCausalLM.from_pretrained``:

**Prune on load.** ``from_pretrained(path, quantization_config=MSPConfig(...))`` loads the dense weights, then
runs ``MSPPruner(model, tokenizer).prune(config)``. The calibration tokenizer is loaded from the same
``path``; to use pre-tokenized windows (or another tokenizer) wrap the call in :func:`calibration_data`.

**Verify on load.** A pruned checkpoint carries, besides its plan in ``config.sparsity_plan``, the marker
``config.msp_checkpoint = {"checkpoint_format": "dense" | "compact", "format_version": 1}``
(:mod:`optimum_msp.checkpoint.marker`). With ``optimum_msp`` imported, loading such a checkpoint goes through the
same quantizer, which decompresses compact weights (see :mod:`optimum_msp.checkpoint.codec`) and then checks every
planned layer with :meth:`SparsityPlan.verify`: a malformed or forged plan, or weights that break it, raise
:class:`~optimum_msp.plan.PlanError` naming the layer.

transformers only consults a quantizer when the config has a ``quantization_config``. A compact checkpoint keeps
one (``quant_method: "msp"``): nothing can load it without ``optimum_msp`` anyway. A dense checkpoint must not:
lm-eval's hf backend resolves that entry with ``AutoQuantizationConfig.from_dict`` and vLLM with its own registry,
and both refuse an unknown method. So for dense checkpoints this module wraps one function of transformers,
``transformers.modeling_utils.get_hf_quantizer`` (:func:`install_load_hook`, done on import): when a config
carries the dense marker and the call names no ``quantization_config`` of its own, the wrapper passes
:class:`MSPCheckpointConfig` as if the caller had; anything else goes through unchanged. Passing
``quantization_config=MSPCheckpointConfig()`` does the same explicitly. Without ``optimum_msp`` every tool loads a
dense checkpoint as a plain model, silently (the marker and the plan stay in its config).

Either way the returned model is a plain dense model: the quantizer detaches itself after loading (no
``hf_quantizer``, ``is_quantized`` unset, no ``quantization_config``), so it trains with ``Trainer`` (full
fine-tuning), casts with ``.to(torch.bfloat16)`` and saves with ``save_pretrained`` exactly like a model loaded
without a quantizer; only the dense marker is kept so that the saved checkpoint is verified again when reloaded.

Checkpoints with the older marker ``quantization_config = {"quant_method": "msp", "checkpoint_format": "dense",
...}`` still load and verify (and are saved back in the new form). Checkpoints whose config has a plan but no
marker load without verification; :func:`verify_pruned` checks any loaded model explicitly.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..checkpoint import codec
from ..checkpoint.marker import (  # noqa: F401  (checkpoint_marker: public here too)
    CHECKPOINT_FORMATS, MARKER_KEY, MARKER_VERSION, QUANT_METHOD, checkpoint_marker, mark_pruned, marker_format,
    verify_pruned,
)
from ..configuration import MSPConfig
from ..plan import PlanError
from ..pruner import MSPPruner
from ..utils.memory import release_file_pages, trim_heap

logger = logging.getLogger(__name__)

__all__ = [
    "MSPCheckpointConfig",
    "MSPHfQuantizer",
    "calibration_data",
    "checkpoint_marker",
    "install_load_hook",
    "mark_pruned",
    "register",
    "verify_pruned",
]


# ------------------------------------------------------------------------------------------------- configs
@dataclass
class MSPCheckpointConfig(QuantizationConfigMixin):
    """A pruned checkpoint's marker as a quantization config: "verify me (and decompress me) when loading".

    It is what transformers builds from ``quantization_config`` dicts with ``quant_method="msp"`` (compact
    checkpoints, and dense ones saved before the marker moved out of ``quantization_config``); a dict without
    ``checkpoint_format`` is an :class:`MSPConfig` (prune-on-load) instead. Passed to ``from_pretrained`` of a
    dense checkpoint it verifies the weights against the plan (what the load hook does for marked checkpoints).
    """

    checkpoint_format: str = "dense"
    format_version: int = MARKER_VERSION
    quant_method: str = QUANT_METHOD

    def __post_init__(self):
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {self.quant_method!r}.")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"The checkpoint marker's checkpoint_format {self.checkpoint_format!r} is not one of "
                f"{CHECKPOINT_FORMATS}; the checkpoint may need a newer optimum-msp."
            )
        if self.format_version != MARKER_VERSION:
            raise ValueError(
                f"The checkpoint marker's format_version {self.format_version!r} is not supported (this optimum-msp "
                f"reads {MARKER_VERSION}); upgrade optimum-msp."
            )

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        if "checkpoint_format" not in config_dict:
            return MSPConfig.from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config_dict) - names
        if unknown:
            raise ValueError(f"Unknown keys {sorted(unknown)} in the msp checkpoint marker; known: {sorted(names)}.")
        config = cls(**config_dict)
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_diff_dict(self) -> Dict[str, Any]:
        return self.to_dict()


# --------------------------------------------------------------------------------------- calibration data
_CALIBRATION: contextvars.ContextVar[Optional[Dict[str, Any]]] = contextvars.ContextVar(
    "optimum_msp_calibration", default=None
)


@contextlib.contextmanager
def calibration_data(input_ids: Optional[torch.Tensor] = None, tokenizer: Any = None) -> Iterator[None]:
    """Calibration for prune-on-load calls made inside the block.

    ``input_ids`` ([samples, seqlen] token ids) replaces the dataset named in the :class:`MSPConfig`;
    ``tokenizer`` replaces the one loaded from the checkpoint folder (the config's dataset is still used).

    >>> with calibration_data(ids):
    ...     model = AutoModelForCausalLM.from_pretrained(path, quantization_config=MSPConfig(method="wanda"))
    """
    if input_ids is None and tokenizer is None:
        raise ValueError("calibration_data needs input_ids, a tokenizer, or both.")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError("calibration_data(input_ids=...) must be a [samples, seqlen] tensor of token ids.")
    token = _CALIBRATION.set({"input_ids": input_ids, "tokenizer": tokenizer})
    try:
        yield
    finally:
        _CALIBRATION.reset(token)


# ----------------------------------------------------------------------------------------------- quantizer
class MSPHfQuantizer(HfQuantizer):
    """Prunes after the weights are loaded (``MSPConfig``), or verifies and decompresses a pruned checkpoint.

    After loading, the model is detached from this quantizer: it behaves as a plain dense model.
    """

    requires_calibration = False

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self._decode_errors: Dict[str, str] = {}

    # -- what transformers asks ------------------------------------------------------------------------
    @property
    def is_compact(self) -> bool:
        return self.pre_quantized and getattr(self.quantization_config, "checkpoint_format", None) == "compact"

    @property
    def verifies(self) -> bool:
        """Loading a pruned checkpoint (verify), not pruning while loading."""
        return self.pre_quantized or isinstance(self.quantization_config, MSPCheckpointConfig)

    def validate_environment(self, device_map=None, **kwargs):
        if not self.verifies and isinstance(device_map, dict) and {"disk", "meta"} & set(device_map.values()):
            raise ValueError(
                "Pruning while loading needs every weight in memory: drop disk offloading from device_map."
            )

    @property
    def serialized_names(self) -> Dict[str, list]:  # read by the base class (converters, parallel plans)
        return {"weight": list(codec.SERIALIZED_NAMES)} if self.is_compact else {}

    def get_load_operations(self) -> dict:
        return {"deserialize": _MSPDecompress} if self.is_compact else {}

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    def _process_model_before_weight_loading(self, model, **kwargs):
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        try:
            if self.verifies:
                self._check_checkpoint(model)
            else:
                self._prune(model)
        finally:
            _detach(model)
        return model

    # -- our work -------------------------------------------------------------------------------------------
    def _check_checkpoint(self, model) -> None:
        if self._decode_errors:
            layer, error = next(iter(self._decode_errors.items()))
            more = f" (and {len(self._decode_errors) - 1} more layer(s))" if len(self._decode_errors) > 1 else ""
            raise PlanError(f"Layer {layer!r}: its compact weights cannot be decoded: {error}{more}")
        report = verify_pruned(model)
        mark_pruned(model)  # the in-memory model is dense whatever the checkpoint was (an older marker: migrated)
        logger.info("Verified %d pruned layers against the sparsity plan (global sparsity %.4f)",
                    len(report.layers), report.global_sparsity)

    def _prune(self, model) -> None:
        config = self.quantization_config
        if not isinstance(config, MSPConfig):
            raise TypeError(f"Prune-on-load needs an MSPConfig, got {type(config).__name__}.")
        context = _CALIBRATION.get() or {}
        calibration = context.get("input_ids")
        tokenizer = context.get("tokenizer")
        if tokenizer is None and config.needs_calibration:
            # with pre-tokenized windows the tokenizer is optional (some allocations still use it if present)
            tokenizer = _load_tokenizer(model, config, required=calibration is None)
        MSPPruner(model, tokenizer).prune(config, calibration=calibration)
        mark_pruned(model)

    def record_decode_error(self, layer: str, error: Exception) -> None:
        self._decode_errors.setdefault(layer, str(error))


def _load_tokenizer(model, config: MSPConfig, required: bool = True):
    from transformers import AutoTokenizer

    source = getattr(model.config, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:  # noqa: BLE001 - any failure means "no tokenizer"; say what to do instead
        if not required:
            logger.info("No tokenizer at %s (%s); pruning with the given calibration ids only", source, error)
            return None
        raise ValueError(
            f"Pruning with method={config.method!r}, allocation={config.allocation!r} while loading needs calibration "
            f"data, but no tokenizer could be loaded from {source!r} ({type(error).__name__}: {error}). Wrap the "
            "from_pretrained call in optimum_msp.integrations.transformers.calibration_data(input_ids=... or "
            "tokenizer=...)."
        ) from None


def _detach(model) -> None:
    """Turn the just-loaded model back into a plain one: no quantizer, no quantized flags, no msp converter."""
    from transformers import PreTrainedModel

    for attribute in ("hf_quantizer", "quantization_method", "is_quantized"):
        model.__dict__.pop(attribute, None)
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config.__dict__.pop("_is_quantized", None)
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        # our decompression cannot be reversed at save time, and the loaded weights are dense anyway
        model._weight_conversions = [
            c for c in conversions if not any(isinstance(op, _MSPDecompress) for op in getattr(c, "operations", ()))
        ]
    if not isinstance(getattr(model.config, "quantization_config", None), (dict, type(None))):
        # the MSPConfig of a prune-on-load, or the MSPCheckpointConfig of a failed verification: none stays behind
        model.config.__dict__.pop("quantization_config", None)


# ----------------------------------------------------------------------------------- decompression on load
try:
    from transformers.core_model_loading import ConversionOps
except ImportError:  # pragma: no cover - transformers without the conversion API cannot load compact checkpoints
    ConversionOps = object


class _MSPDecompress(ConversionOps):
    """Loader op: the tensors collected for one ``...weight`` -> the dense weight (pass-through if not compact)."""

    def __init__(self, quantizer: MSPHfQuantizer):
        # not named ``hf_quantizer``: that would stop transformers from casting the kept values to the load dtype
        self.quantizer = quantizer

    def __deepcopy__(self, memo):
        # transformers deep-copies a converter (and its ops) for every weight; errors must reach *our* quantizer
        return type(self)(self.quantizer)

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, **kwargs):
        meta_key = "weight" + codec.META_SUFFIX
        compact_keys = set(codec.SERIALIZED_NAMES[1:]) & set(input_dict)
        if not compact_keys:
            return input_dict
        tensors = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        model = kwargs.get("model")
        expected = None
        if model is not None and full_layer_name is not None:
            try:
                expected = model.get_parameter(full_layer_name)
            except AttributeError:
                expected = None
        try:
            if meta_key not in tensors:
                # the other compact tensors alone cannot be decoded (and would otherwise be set as unknown module
                # attributes: AttributeError); report it like any other undecodable layer
                raise codec.CompactFormatError(
                    f"'{meta_key}' is missing (found {sorted(compact_keys)}): the checkpoint is incomplete or was "
                    "edited; save it again.")
            dense = codec.decode_layer(tensors, None if expected is None else expected.shape)
            if expected is not None and dense.dtype != expected.dtype:  # deflated values keep their saved dtype
                dense = dense.to(expected.dtype)
        except codec.CompactFormatError as error:
            layer = (full_layer_name or "?").removesuffix(".weight")
            self.quantizer.record_decode_error(layer, error)
            if expected is None:
                raise
            dense = torch.zeros(expected.shape, dtype=expected.dtype)  # replaced by an error after loading
        for tensor in tensors.values():  # decoded: their file pages need not stay resident (peak load memory)
            release_file_pages(tensor)
        trim_heap()
        return {full_layer_name: dense}


# ------------------------------------------------------------------------------------------- registration
def _wants_verification(config: Any) -> bool:
    """A config marked as a dense pruned checkpoint, with no quantization config of its own."""
    return marker_format(config) == "dense" and getattr(config, "quantization_config", None) is None


def install_load_hook() -> bool:
    """Wrap ``transformers.modeling_utils.get_hf_quantizer`` so that ``from_pretrained`` of a checkpoint marked
    ``msp_checkpoint: {"checkpoint_format": "dense"}`` is verified (idempotent; done by ``import optimum_msp``).

    Why a wrapper: ``quantization_config`` is transformers' only hook into loading, and a dense checkpoint cannot
    carry one without breaking lm-eval and vLLM. The wrapper changes a call only when the config carries the
    dense marker and the caller passed no ``quantization_config``; it then passes :class:`MSPCheckpointConfig`.
    Returns ``False`` (and logs why) where this transformers has no such function: dense checkpoints then load
    unverified unless ``quantization_config=MSPCheckpointConfig()`` is passed.
    """
    from transformers import modeling_utils

    current = getattr(modeling_utils, "get_hf_quantizer", None)
    if current is None:
        logger.warning("transformers %s has no modeling_utils.get_hf_quantizer: dense pruned checkpoints are not "
                       "verified on load; pass quantization_config=MSPCheckpointConfig() to verify one.",
                       getattr(__import__("transformers"), "__version__", "?"))
        return False
    original = getattr(current, "__wrapped__", current) if getattr(current, "_optimum_msp", False) else current

    @functools.wraps(original)
    def get_hf_quantizer(config, quantization_config, *args, **kwargs):
        if quantization_config is None and kwargs.get("gguf_file") is None and _wants_verification(config):
            marker = {**getattr(config, MARKER_KEY), "quant_method": QUANT_METHOD}
            quantization_config = MSPCheckpointConfig.from_dict(marker)  # a newer or odd marker: a clear error
        return original(config, quantization_config, *args, **kwargs)

    get_hf_quantizer._optimum_msp = True
    modeling_utils.get_hf_quantizer = get_hf_quantizer  # also replaces our own wrapper after an importlib.reload
    return True


def register() -> None:
    """Register ``"msp"`` with transformers and install the load hook (idempotent; called by ``import optimum_msp``)."""
    pairs = ((AUTO_QUANTIZATION_CONFIG_MAPPING, MSPCheckpointConfig), (AUTO_QUANTIZER_MAPPING, MSPHfQuantizer))
    for mapping, value in pairs:
        current = mapping.get(QUANT_METHOD)
        if current is not None and current is not value and getattr(current, "__module__", "") != __name__:
            raise RuntimeError(
                f"transformers already has a quantization method {QUANT_METHOD!r} ({current!r}); optimum-msp cannot "
                "register its own."
            )
        mapping[QUANT_METHOD] = value  # also replaces our own class after an importlib.reload
    install_load_hook()


register()

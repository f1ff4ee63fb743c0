"""What a pruned checkpoint is: the verification marker (:mod:`.marker`), the compact codec (:mod:`.codec`)
and saving dense or compact checkpoints (:mod:`.save`). Loading goes through transformers
(:mod:`optimum_msp.integrations.transformers`)."""

from .codec import COMPACT_MODES, CompactFormatError, decode_layer, encode_layer
from .marker import (
    CHECKPOINT_FORMATS, MARKER_KEY, MARKER_VERSION, checkpoint_marker, compact_quantization_config,
    is_pruned_checkpoint, mark_pruned, marker_format, verify_pruned,
)
from .save import compact_state_dict, encode_module, save_compact, save_pruned

__all__ = [
    "CHECKPOINT_FORMATS", "COMPACT_MODES", "CompactFormatError", "MARKER_KEY", "MARKER_VERSION", "checkpoint_marker",
    "compact_quantization_config", "compact_state_dict", "decode_layer", "encode_layer", "encode_module",
    "is_pruned_checkpoint", "mark_pruned", "marker_format", "save_compact", "save_pruned", "verify_pruned",
]

"""What a pruned checkpoint is: the verification marker (:mod:`.marker`), the compact codec (:mod:`.codec`)
and saving dense or compact checkpoints (:mod:`.save`). Loading goes through transformers
(:mod:`optimum_msp.integrations.transformers`)."""

from .codec import COMPACT_MODES, CompactFormatError, decode_layer, encode_layer
from .marker import (
    CHECKPOINT_FORMATS, MARKER_VERSION, checkpoint_marker, is_pruned_checkpoint, mark_pruned, verify_pruned,
)
from .save import compact_state_dict, encode_module, save_compact, save_pruned

__all__ = [
    "CHECKPOINT_FORMATS", "COMPACT_MODES", "CompactFormatError", "MARKER_VERSION", "checkpoint_marker",
    "compact_state_dict", "decode_layer", "encode_layer", "encode_module", "is_pruned_checkpoint", "mark_pruned",
    "save_compact", "save_pruned", "verify_pruned",
]

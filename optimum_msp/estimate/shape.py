"""The sizes the estimate needs, read from a decoder-only model's ``config.json`` (no weights, no download)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: architectures whose MLP is two linears (up, down) rather than LLaMA's gated three (gate, up, down)
UNGATED_MODEL_TYPES = {"gpt2", "opt", "gpt_neox", "gptj", "gpt_bigcode", "bloom", "falcon", "phi", "starcoder2",
                       "codegen", "mpt"}


def _get(config: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


@dataclass(frozen=True)
class ModelShape:
    """``h`` hidden size, ``i`` MLP width, ``L`` blocks, ``a`` heads (``kv`` key/value heads, ``d`` head size),
    ``V`` vocabulary, ``w`` bytes per weight; ``experts`` MLPs per block (mixture of experts; 1 otherwise)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    gated: bool
    experts: int
    dtype: str

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype: Optional[str] = None) -> "ModelShape":
        """From the dict of a ``config.json`` (LLaMA-style names, with the GPT-2/OPT aliases); ``dtype``: the
        weights' dtype, ``None``/``"auto"`` for the checkpoint's own (``float32`` when the config names none)."""
        hidden = _get(config, "hidden_size", "n_embd", "d_model")
        layers = _get(config, "num_hidden_layers", "n_layer", "num_layers")
        heads = _get(config, "num_attention_heads", "n_head")
        if hidden is None or layers is None or heads is None:
            raise ValueError("The model's config has no hidden_size / num_hidden_layers / num_attention_heads (or "
                             "their GPT-2 names n_embd / n_layer / n_head): cannot estimate it.")
        if dtype in (None, "auto"):
            dtype = _get(config, "dtype", "torch_dtype", default="float32")
        dtype = str(dtype).replace("torch.", "")
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPE_BYTES)}; pass dtype= (--dtype) explicitly.")
        return cls(
            hidden=int(hidden), layers=int(layers), heads=int(heads),
            intermediate=int(_get(config, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden)),
            kv_heads=int(_get(config, "num_key_value_heads", default=heads)),
            head_dim=int(_get(config, "head_dim", default=hidden // heads)),
            vocab=int(_get(config, "vocab_size", default=32000)),
            tied=bool(_get(config, "tie_word_embeddings", default=True)),
            gated=config.get("model_type") not in UNGATED_MODEL_TYPES,
            experts=int(_get(config, "num_local_experts", "num_experts", default=1)),
            dtype=dtype,
        )

    @property
    def width(self) -> int:
        """Bytes per weight (``w``)."""
        return DTYPE_BYTES[self.dtype]

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def mlp_linears(self) -> int:
        return 3 if self.gated else 2

    @property
    def block_params(self) -> int:
        """``P_b``: the weights of one block's linear layers (norms and biases, under 0.1 %, left out)."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attention = 2 * h * self.attention_width + 2 * h * kv
        return attention + self.experts * self.mlp_linears * h * self.intermediate

    @property
    def pruned_params(self) -> int:
        """Weights of every block's linears: what the default targets prune."""
        return self.layers * self.block_params

    @property
    def outside_params(self) -> int:
        """Embeddings and head (one matrix when tied)."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def largest_linear(self) -> int:
        return max(self.hidden * self.intermediate, self.hidden * self.attention_width)

    @property
    def widest_input(self) -> int:
        return max(self.hidden, self.intermediate, self.attention_width)

    def distinct_inputs(self) -> List[int]:
        """Widths of the distinct inputs of one block's linears, in the order they run (layers fed the same tensor,
        q/k/v or gate/up, share one): q/k/v, o, then per expert gate/up and down."""
        return [self.hidden, self.attention_width] + [self.hidden, self.intermediate] * self.experts

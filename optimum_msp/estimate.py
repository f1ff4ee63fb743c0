"""Know before you run: the expected peak host memory of a prune, from the model's config and the settings.

The model is never loaded: only its ``config.json`` is read. A run holds, for its whole length, the
``runtime`` (the Python process with torch and transformers imported, 0.3 GB, and what allocators and mapped
files add: 0.45 GB in all, fitted to one measured run) and the ``resident_weights`` (all
weights, or with the decoder blocks offloaded to disk only the embeddings, final norm and head); on top of that,
each stage holds its own working set, and the peak is the largest of them:

* ``prune`` (every run; also OWL's and the search's statistics passes): the calibration windows' hidden states
  entering a block and leaving it, one window's attention scores and MLP activations, one block brought in from
  disk (offloaded runs), the fp32 working copies of the layer being pruned, and the block's input statistics
  (SparseGPT: a Hessian per distinct input, and three matrices of the widest one's size while it is factorized);
* ``fisher`` (``fisher``, ``msp``): one sequence's backward: with the model in memory every block's activations
  at once, block by block when offloaded; plus the head's logits;
* ``search`` (``msp``): the dense copy of every pruned weight kept to restore the model, the bank of pruned
  weights or masks (about 4.5 visited levels per layer), every block's statistics, the cache of block outputs
  (up to ``search_cache_mb``), and the fitness windows' logits.

``docs/scaling.md`` gives the formulas and compares them with measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

GIB = 2**30
RUNTIME_BYTES = int(0.45 * GIB)  # imports (0.3 GB) + allocator and mapped-file overhead: fitted, docs/scaling.md
#: distinct levels the MSP search visits per layer (entries of its bank), measured on SmolLM2
BANK_LEVELS = 4.5
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Estimate:
    """Expected host memory in bytes: what the whole run holds (``base``), and each stage's own working set."""

    base: Dict[str, int] = field(default_factory=dict)
    stages: Dict[str, Dict[str, int]] = field(default_factory=dict)

    def stage_total(self, stage: str) -> int:
        return sum(self.base.values()) + sum(self.stages[stage].values())

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=self.stage_total)

    @property
    def total(self) -> int:
        """The expected peak: the base plus the largest stage."""
        return self.stage_total(self.peak_stage)

    def table(self) -> str:
        rows = ["| stage | component | GiB |", "|---|---|---:|"]
        rows += [f"| (whole run) | {name} | {size / GIB:.2f} |" for name, size in self.base.items()]
        for stage, parts in self.stages.items():
            rows += [f"| {stage} | {name} | {size / GIB:.2f} |" for name, size in parts.items()]
            rows.append(f"| {stage} | *stage peak* | *{self.stage_total(stage) / GIB:.2f}* |")
        rows.append(f"| **peak** | **{self.peak_stage}** | **{self.total / GIB:.2f}** |")
        return "\n".join(rows)


def _get(config: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def estimate_memory(model_config: Mapping[str, Any], *, method: str = "wanda", allocation: str = "uniform",
                    num_calibration_samples: int = 32, seqlen: int = 2048, batch_size: int = 1,
                    dtype: Optional[str] = None, offloaded: bool = False, fisher_seqlen: int = 512,
                    search_cache_mb: int = 1024, fitness_samples: int = 4, fitness_seqlen: int = 256,
                    population_size: int = 12, generations: int = 10) -> Estimate:
    """The expected peak host memory of a prune of the decoder-only model described by ``model_config`` (the dict
    of its ``config.json``: LLaMA-style names, with GPT-2/OPT aliases)."""
    hidden = _get(model_config, "hidden_size", "n_embd", "d_model")
    layers = _get(model_config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(model_config, "num_attention_heads", "n_head")
    if hidden is None or layers is None or heads is None:
        raise ValueError("The model's config has no hidden_size / num_hidden_layers / num_attention_heads (or their "
                         "GPT-2 names): cannot estimate it.")
    inter = _get(model_config, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden)
    kv_heads = _get(model_config, "num_key_value_heads", default=heads)
    head_dim = _get(model_config, "head_dim", default=hidden // heads)
    vocab = _get(model_config, "vocab_size", default=32000)
    tied = bool(_get(model_config, "tie_word_embeddings", default=True))
    dtype = dtype if dtype not in (None, "auto") else _get(model_config, "dtype", "torch_dtype", default="float32")
    width = _DTYPE_BYTES.get(str(dtype).replace("torch.", ""), 4)

    block_params = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter
    outside = vocab * hidden * (1 if tied else 2)
    largest = max(hidden * inter, hidden * heads * head_dim)
    hessians = (2 * hidden**2 + (heads * head_dim) ** 2 + inter**2) * 4 if method == "sparsegpt" else 0

    def window(tokens: int) -> int:  # one window through a block: attention scores (fp32) and MLP activations
        return batch_size * tokens * (heads * tokens * 4 + 3 * inter * width)

    def logits(tokens: int) -> int:  # the head's logits in fp32, and the log-softmax of the loss
        return tokens * vocab * 4 * 2

    base = {"runtime": RUNTIME_BYTES,
            "resident_weights": (outside if offloaded else outside + layers * block_params) * width}
    calibration = num_calibration_samples * seqlen * hidden * width
    prune = {"calibration_activations": 2 * calibration, "block_activations": window(seqlen),
             "block_from_disk": block_params * width if offloaded else 0, "layer_fp32_copies": 3 * largest * 4}
    if hessians:
        # the block's Hessians, and the factorization of the widest one (SparseGPT's inverse Cholesky factor):
        # the Hessian read back symmetric, and two of dampened copy / factor / inverse / its factor at a time
        widest = max(hidden, inter, heads * head_dim)
        prune["statistics"] = hessians + 3 * widest**2 * 4
    stages = {"prune": prune}
    if allocation in ("fisher", "msp"):
        per_block = fisher_seqlen * (12 * hidden + 4 * inter) * 4 + heads * fisher_seqlen**2 * 4
        stages["fisher"] = {
            # in memory: autograd keeps every block's activations; block by block: every block's input only
            "backward_activations": (per_block * layers if not offloaded
                                     else fisher_seqlen * hidden * width * layers + 2 * per_block),
            "block_from_disk": block_params * width if offloaded else 0,
            "head_logits": logits(fisher_seqlen),
        }
    if allocation == "msp":
        pruned = layers * block_params
        entry = fitness_samples * fitness_seqlen * hidden * width
        cache = min(search_cache_mb * 2**20, population_size * (generations + 1) * layers * entry)
        stages["search"] = {
            "dense_copy": pruned * width,
            "bank": int(pruned * BANK_LEVELS * (width if method == "sparsegpt" else 1)),
            "search_statistics": layers * hessians,
            "block_output_cache": cache + entry,
            "fitness_logits": logits(fitness_samples * fitness_seqlen),
            "block_from_disk": block_params * width if offloaded else 0,
        }
    return Estimate(base, stages)

"""The formulas: what each stage of a prune holds on the compute device, in host memory and on disk.

Every term below is in ``docs/scaling.md``'s table with its symbol; the comments say which code holds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .budget import GIB, check_devices, format_gib, normal_device, parse_max_memory
from .shape import ModelShape

#: the Python process with torch and transformers imported (0.3 GiB) plus allocator and mapped-file overhead,
#: fitted to the 135M disk row of bench/scaling.py (CPU-only torch; CUDA's libraries add their own pages)
RUNTIME_BYTES = int(0.45 * GIB)
#: the CUDA context and library workspaces on the GPU: an assumption (typically 0.3-0.6 GB), not measured here
CUDA_CONTEXT_BYTES = 512 * 2**20
#: transformers' ``save_pretrained`` default shard size: a shard of tensors not already in host memory comes
#: to the host at once
DEFAULT_SHARD_BYTES = 50 * 10**9
#: where the weights are held; see docs/scaling.md
PLACEMENTS = {
    "device": "the whole model in memory on the compute device",
    "host": "the model in host memory, each block moved to the GPU for its turn",
    "cpu-offload": "blocks offloaded by accelerate to host memory, embeddings and head on the compute device",
    "disk": "blocks offloaded to disk, embeddings and head on the compute device",
}
SAVES = ("dense", "sparse", "deflate")
RESOURCES = ("device", "host", "disk")


@dataclass
class Estimate:
    """Expected bytes per stage and resource: ``base`` is held the whole run (device and host memory), each
    stage adds its own parts; disk is what the run's files take while the stage runs. On a CPU compute device the
    device is the host: its parts are counted in ``host``."""

    device: str
    weights: str
    dtype: str
    base: Dict[str, Dict[str, int]]
    stages: Dict[str, Dict[str, Dict[str, int]]]
    max_memory: Dict[str, int] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    @property
    def resources(self) -> Tuple[str, ...]:
        return RESOURCES if self.device != "cpu" else RESOURCES[1:]

    def label(self, resource: str) -> str:
        """The ``max_memory`` key of a resource."""
        return {"device": self.device, "host": "cpu", "disk": "disk"}[resource]

    def parts(self, stage: str, resource: str) -> Dict[str, int]:
        parts = dict(self.base.get(resource, {}))
        for name, size in self.stages[stage].get(resource, {}).items():
            parts[name] = parts.get(name, 0) + size
        return parts

    def need(self, stage: str, resource: str) -> int:
        return sum(self.parts(stage, resource).values())

    def peak(self, resource: str) -> Tuple[str, int]:
        """The stage that needs the most of ``resource``, and how much."""
        stage = max(self.stages, key=lambda name: self.need(name, resource))
        return stage, self.need(stage, resource)

    @property
    def total(self) -> int:
        """The peak of host memory (on a CPU compute device: of all memory)."""
        return self.peak("host")[1]

    def shortfalls(self, stage: str) -> List[str]:
        """``"<resource> needs X GiB, has Y GiB"`` for each resource of ``max_memory`` the stage exceeds."""
        out = []
        for resource in self.resources:
            has = self.max_memory.get(self.label(resource))
            needs = self.need(stage, resource)
            if has is not None and needs > has:
                out.append(f"{self.label(resource)} needs {format_gib(needs)} GiB, has {format_gib(has)} GiB")
        return out

    def verdict(self, stage: str) -> str:
        if not self.max_memory:
            return "(no max_memory given)"
        short = self.shortfalls(stage)
        return "does not fit: " + "; ".join(short) if short else "fits"

    @property
    def fits(self) -> bool:
        """Every stage within ``max_memory`` (resources it does not name are not limited)."""
        return not any(self.shortfalls(stage) for stage in self.stages)

    def summary(self) -> str:
        names = {"device": f"device ({self.device}) GiB", "host": "host GiB", "disk": "disk GiB"}
        if self.device == "cpu":
            names["host"] = "host (= device, cpu) GiB"
        header = ["stage", *(names[r] for r in self.resources), "verdict"]
        rows = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(self.resources) + "---|"]
        for stage in self.stages:
            cells = [format_gib(self.need(stage, r)) for r in self.resources]
            rows.append(f"| {stage} | " + " | ".join(cells) + f" | {self.verdict(stage)} |")
        return "\n".join(rows)

    def components(self, stage: Optional[str] = None) -> str:
        """What makes up ``stage`` (default: each resource's peak stage), largest first."""
        rows = ["| stage | resource | component | GiB |", "|---|---|---|---:|"]
        for resource in self.resources:
            name = stage if stage is not None else self.peak(resource)[0]
            parts = sorted(self.parts(name, resource).items(), key=lambda item: -item[1])
            rows += [f"| {name} | {self.label(resource)} | {part} | {format_gib(size)} |" for part, size in parts
                     if size >= GIB / 200]  # what rounds to 0.00 GiB is left out
        return "\n".join(rows)


def _settings(config: Any, options: Dict[str, Any]) -> Dict[str, Any]:
    """The run's options: an :class:`~optimum_msp.MSPConfig`, or ``options`` (its field names), resolved."""
    from ..configuration import MSPConfig, config_fields

    fields = config_fields()
    if config is None:
        config = MSPConfig(**options)
    elif options:
        raise ValueError(f"Pass either an MSPConfig or option keywords ({sorted(options)}), not both.")
    resolved = config.resolved()
    values = {name: getattr(resolved, name) for name in fields}
    values["pattern_kind"] = resolved.pattern_kind
    return values


def visited_levels(options: Mapping[str, Any]) -> int:
    """The most levels the search can visit per unit (the bound of its bank): every level within
    ``max_deviation`` of the target (LevelSpace.build's bounds), and no more than the plans it evaluates."""
    target, deviation = options["sparsity"], options["max_deviation"]
    if options["pattern_kind"] in ("mixed-n:m", "n:m"):
        m = options["m"]
        low = max(0, math.ceil((target - deviation) * m - 1e-9))
        high = min(m - 1, math.floor((target + deviation) * m + 1e-9))
        levels = high - low + 1
    else:
        step = options["level_step"]
        levels = (math.floor(min(deviation, target) / step + 1e-9)
                  + math.floor(min(deviation, options["max_layer_sparsity"] - target) / step + 1e-9) + 1)
    evaluated = options["population_size"] * (options["generations"] + 1)
    return max(1, min(levels, evaluated))


def compact_bytes_per_weight(options: Mapping[str, Any], width: int) -> float:
    """Bytes per pruned weight in a compact checkpoint (checkpoint/codec.py; never more than dense)."""
    kept = 1.0 - options["sparsity"]
    if options["pattern_kind"] in ("n:m", "mixed-n:m"):
        return min(width, kept * (width + math.ceil(math.log2(options["m"])) / 8))
    return min(width, 1 / 8 + kept * width)


def estimate_memory(model_config: Mapping[str, Any], config: Any = None, *, device: str = "cpu",
                    weights: str = "device", dtype: Optional[str] = None, max_memory: Any = None,
                    evaluate: bool = True, save: Optional[str] = "dense", max_shard_size: int = DEFAULT_SHARD_BYTES,
                    **options: Any) -> Estimate:
    """Expected peak device memory, host memory and disk of each stage of a prune, from the model's config alone.

    ``model_config``: the dict of the model's ``config.json`` (``AutoConfig.from_pretrained(id).to_dict()``; no
    weights are read). The run: an :class:`~optimum_msp.MSPConfig` (``config``) or its fields as keywords
    (``method="sparsegpt", allocation="msp", search_bank_mb=512, ...``). The setup: ``device`` the compute device
    (``"cpu"``, ``"cuda"``, ``"cuda:N"``), ``weights`` where the weights are held (one of :data:`PLACEMENTS`),
    ``dtype`` of the weights (default: the checkpoint's), ``max_memory`` what the machine offers, as accelerate's
    dict (``{0: "80GiB", "cpu": "200GiB"}``) or text (``"cuda:0=80GiB,cpu=200GiB,disk=1TB"``). ``evaluate``: the
    run ends with a perplexity evaluation; ``save``: ``"dense"``, ``"sparse"``, ``"deflate"`` or ``None``.
    """
    shape = ModelShape.from_config(model_config, dtype)
    device = normal_device(device)
    if weights not in PLACEMENTS:
        raise ValueError(f"weights={weights!r}: choose where the weights are held from {list(PLACEMENTS)}.")
    if save not in (None, "none", *SAVES):
        raise ValueError(f"save={save!r}: choose one of {list(SAVES)} or None.")
    budget = parse_max_memory(max_memory)
    check_devices(budget, device)
    settings = _settings(config, dict(options))
    terms = _Terms(shape, settings, device, weights, max_shard_size)
    stages: Dict[str, Dict[str, Dict[str, int]]] = {"load": {}}
    for name, build in terms.stage_builders(evaluate, None if save == "none" else save):
        stages[name] = build()
    return Estimate(device, weights, shape.dtype, terms.base(), stages, budget, terms.notes)


class _Parts:
    """Components of one stage; on a CPU compute device the device's parts go to the host."""

    def __init__(self, gpu: bool):
        self.gpu = gpu
        self.parts: Dict[str, Dict[str, int]] = {}

    def add(self, resource: str, name: str, size: float) -> "_Parts":
        resource = resource if self.gpu or resource != "device" else "host"
        if size:
            bucket = self.parts.setdefault(resource, {})
            bucket[name] = bucket.get(name, 0) + int(size)
        return self


class _Terms:
    def __init__(self, shape: ModelShape, options: Dict[str, Any], device: str, weights: str, shard: int):
        from ..pruners import PRUNERS
        from ..statistics import InputHessian, InputNorms

        self.s, self.o, self.weights, self.shard = shape, options, weights, shard
        self.gpu = device != "cpu"
        self.w = shape.width
        pruner = PRUNERS.get(options["method"])()
        self.pruner = pruner
        self.notes: List[str] = []
        kind = type(pruner.new_statistics(1)) if pruner.needs_calibration else None
        self.hessians = kind is not None and issubclass(kind, InputHessian)
        if kind is not None and not issubclass(kind, (InputHessian, InputNorms)):
            self.hessians = True
            self.notes.append(f"{options['method']}'s statistics are unknown to the estimate: counted as Hessians.")
        inputs = shape.distinct_inputs()
        # one block's statistics: a Hessian (fp32 [x, x]) or input norms (fp64 [x]) per distinct input
        self.block_stats = (sum(x * x * 4 for x in inputs) if self.hessians
                            else sum(x * 8 for x in inputs) if kind is not None else 0)
        # SparseGPT's factorization, in the order the layers are pruned: the factors of the inputs before
        # stay cached (per statistic) while the widest one's symmetric Hessian and two working matrices live
        self.factorization = (max(sum(x * x for x in inputs[:k]) + 3 * inputs[k] ** 2 for k in range(len(inputs))) * 4
                              if self.hessians else 0)
        self.w_blocks = shape.pruned_params * self.w
        self.w_outside = shape.outside_params * self.w
        self.block = shape.block_params * self.w
        self.layer = shape.largest_linear * self.w
        self.calibrated = pruner.needs_calibration

    # ------------------------------------------------------------------------------------------- helpers
    def parts(self) -> _Parts:
        return _Parts(self.gpu)

    def window(self, tokens: int, batch: int) -> int:
        """One batch through one block: the attention scores (fp32, an upper bound: SDPA kernels hold less) and
        the MLP's activations."""
        s = self.s
        return batch * tokens * (s.heads * tokens * 4 + s.mlp_linears * s.intermediate * self.w)

    def calibration(self, p: _Parts, statistics: Optional[int] = None) -> None:
        """The sequential passes' terms; ``statistics``: one block's, when not the pruner's own."""
        o, s = self.o, self.s
        statistics = self.block_stats if statistics is None else statistics
        n, t, b = o["num_calibration_samples"], o["seqlen"], o["batch_size"]
        # the hidden states of every window entering the block; each batch's output replaces its input
        p.add("device", "calibration activations", (n + b) * t * s.hidden * self.w)
        p.add("device", "one batch through a block", self.window(t, b))
        if statistics:
            p.add("device", "one block's input statistics", statistics)
            p.add("device", "statistics update (one batch in fp32)", 2 * b * t * s.widest_input * 4)

    @property
    def moves_blocks(self) -> bool:
        """Each block's weights are brought to the compute device for its turn."""
        return (self.gpu and self.weights != "device") or self.weights == "disk"

    def transit(self, p: _Parts) -> None:
        if self.moves_blocks:
            p.add("device", "one block's weights", self.block)
        if self.weights == "disk" and self.gpu:
            p.add("host", "one layer read from disk", self.layer)

    @property
    def head(self) -> str:
        """Where the embeddings, final norm and head compute: the host when the model is held there."""
        return "host" if self.weights == "host" else "device"

    # --------------------------------------------------------------------------------------------- stages
    def base(self) -> Dict[str, Dict[str, int]]:
        p = self.parts().add("host", "runtime", RUNTIME_BYTES)
        if self.gpu:
            p.add("device", "CUDA context (assumed)", CUDA_CONTEXT_BYTES)
        if self.weights in ("device", "host"):
            p.add("device" if self.weights == "device" else "host", "weights", self.w_blocks + self.w_outside)
        else:
            p.add("device", "embeddings and head", self.w_outside)
            if self.weights == "cpu-offload":
                p.add("host", "block weights (accelerate's weights map)", self.w_blocks)
        return p.parts

    def stage_builders(self, evaluate: bool, save: Optional[str]):
        allocation = self.o["allocation"]
        searching = allocation == "msp"
        if self.calibrated or allocation == "owl":
            yield "capture", self.capture
        if allocation in ("fisher", "msp"):
            yield "fisher", self.fisher
        if allocation == "owl":
            yield "owl statistics", self.owl
        if searching and self.calibrated:
            yield "search statistics", self.search_statistics
        if searching:
            yield "search", self.search
        yield "prune", self.prune
        if evaluate:
            yield "evaluation", self.evaluation
        if save:
            yield f"save ({save})", lambda: self.save(save)

    def capture(self) -> Dict[str, Dict[str, int]]:
        o = self.o
        activations = o["num_calibration_samples"] * o["seqlen"] * self.s.hidden * self.w
        p = self.parts().add("device", "calibration activations", activations)
        if self.gpu and self.weights == "host":
            p.add("host", "calibration activations (captured on the host, then moved)", activations)
        return p.parts

    def fisher(self) -> Dict[str, Dict[str, int]]:
        s, f = self.s, min(self.o["fisher_seqlen"], self.o["seqlen"])
        p = self.parts()
        # what autograd keeps of one block for one sequence: the linears' inputs and outputs, rotary and attention
        # tensors (~12 h-wide), the gated MLP's four i-wide tensors (two ungated), in the model's dtype; both norms'
        # fp32 inputs; the attention scores in fp32 (eager attention; SDPA's kernels keep less)
        mlp = (4 if s.gated else 2) * s.intermediate
        per_block = f * ((12 * s.hidden + mlp) * self.w + 2 * s.hidden * 4) + s.heads * f * f * 4
        logits = f * s.vocab * (self.w + 12)
        # allocation/fisher.py: one backward through the whole model when it is all in memory on the compute
        # device, block by block otherwise
        if self.weights == "device" or (not self.gpu and self.weights == "host"):
            p.add("device", "every block's activations (one sequence)", s.layers * per_block)
            p.add("device", "one layer's weight gradient", s.largest_linear * (self.w + 8))
            p.add("device", "head logits and loss", logits)
        else:
            p.add("device", "every block's input (one sequence)", (s.layers + 1) * f * s.hidden * self.w)
            p.add("device", "one block's backward", 2 * per_block)
            p.add("device", "one weight gradient (fp32) and its square", s.largest_linear * 8)
            p.add(self.head, "head logits and loss", logits)
            self.transit(p)
        return p.parts

    def owl(self) -> Dict[str, Dict[str, int]]:
        p = self.parts()
        self.calibration(p, statistics=sum(x * 8 for x in self.s.distinct_inputs()))  # OWL: input norms, fp64
        self.transit(p)
        # allocation/owl.py: every layer's |W| * ||X|| of one block, in fp32, where the weights are stored
        p.add("device" if self.weights == "device" else "host", "one block's outlier scores", self.s.block_params * 12)
        return p.parts

    def search_statistics(self) -> Dict[str, Dict[str, int]]:
        p = self.parts()
        self.calibration(p)
        self.transit(p)
        choice = self.o["search_statistics"]
        seeded = choice == "seed" or (choice == "auto" and self.pruner.updates_weights)
        if seeded:  # a sequential prune with the Fisher seed plan; the pruned weights are substituted at forward
            p.add("device", "factorization", self.factorization)
            p.add("device", "layer fp32 working copies", 3 * self.s.largest_linear * 4)
            p.add("device", "one block's pruned weights", self.block)
        if self.gpu:
            p.add("host", "one block's statistics on their way to disk", self.block_stats)
        p.add("disk", "search statistics (work folder)", self.s.layers * self.block_stats)
        return p.parts

    def search(self) -> Dict[str, Dict[str, int]]:
        s, o, p = self.s, self.o, self.parts()
        per_weight = self.w if self.pruner.updates_weights else 1  # a pruned weight, or a bool mask
        levels = visited_levels(o)
        bank = s.pruned_params * levels * per_weight
        p.add("device", "weight bank (LRU, search_bank_mb)", min(o["search_bank_mb"] << 20, bank))
        self.transit(p)
        if self.calibrated:
            p.add("device", "one block's statistics (loaded)", self.block_stats)
        p.add("device", "factorization", self.factorization)
        p.add("device", "layer fp32 working copies (a bank entry)", 3 * s.largest_linear * 4)
        if not self.pruner.updates_weights:  # a masked weight built for the forward
            p.add("device", "candidate weight of one layer", s.largest_linear * (4 + self.w))
        entry = o["fitness_samples"] * o["fitness_seqlen"] * s.hidden * self.w  # one plan's outputs of one block
        windows = o.get("fitness_pool") or o["fitness_samples"]  # a pool's windows are all captured
        cache = min(o["search_cache_mb"] << 20, o["population_size"] * (o["generations"] + 1) * s.layers * entry)
        p.add("device", "hidden-state cache (search_cache_mb)", cache)
        p.add("device", "fitness windows' block inputs", windows * o["fitness_seqlen"] * s.hidden * self.w)
        p.add("device", "one generation's hidden states", o["population_size"] * entry)
        p.add("device", "one batch through a block", self.window(o["fitness_seqlen"], o["batch_size"]))
        tokens = windows * o["fitness_seqlen"]
        # allocation/search/fitness.py: the loss is taken batch by batch, one batch's logits alive
        p.add(self.head, "fitness logits (one batch)", o["batch_size"] * o["fitness_seqlen"] * s.vocab * (self.w + 8))
        if o["fitness"] == "kl":
            p.add(self.head, "dense reference log-probabilities", tokens * s.vocab * 4)
        if self.gpu:
            p.add("host", "one block's statistics (loading) and one spilled entry",
                  self.block_stats + s.largest_linear * per_weight)
        p.add("disk", "search statistics (work folder)", s.layers * self.block_stats)
        p.add("disk", f"spilled bank entries (bound: {levels} levels per layer)", bank)
        return p.parts

    def prune(self) -> Dict[str, Dict[str, int]]:
        s, p = self.s, self.parts()
        if self.calibrated and self.o["allocation"] == "msp" and self.o["final_statistics"] == "search":
            # the search's statistics, read back one block at a time: no calibration pass
            p.add("device", "one block's statistics (loaded)", self.block_stats)
            p.add("device", "factorization", self.factorization)
            p.add("disk", "search statistics (work folder)", s.layers * self.block_stats)
        elif self.calibrated:
            self.calibration(p)
            p.add("device", "factorization", self.factorization)
            self.transit(p)
        p.add("device", "layer fp32 working copies", 3 * s.largest_linear * 4)
        if self.weights != "device" and self.gpu:
            p.add("device", "the layer's weight, copied to the device", self.layer)
        if self.weights == "disk":
            p.add("host", "one layer read from and written to disk", 2 * self.layer)
            p.add("disk", "pruned weights (offload folder)", self.w_blocks)
        return p.parts

    def evaluation(self) -> Dict[str, Dict[str, int]]:
        s, t, p = self.s, self.o["seqlen"], self.parts()
        # evaluation/perplexity.py runs the whole model where it is held: on the host for weights="host"
        where = "host" if self.weights == "host" else "device"
        p.add(where, "one window through a block", self.window(t, 1) + 2 * t * s.hidden * self.w)
        p.add(where, "logits and loss (one window)", t * s.vocab * (self.w + 8))
        if self.weights in ("cpu-offload", "disk") and self.moves_blocks:
            p.add("device", "one block's weights", self.block)
        if self.weights == "disk":
            p.add("disk", "pruned weights (offload folder)", self.w_blocks)
        return p.parts

    def save(self, mode: str) -> Dict[str, Dict[str, int]]:
        p = self.parts()
        if self.weights == "disk":
            p.add("disk", "pruned weights (offload folder)", self.w_blocks)
        # tensors not already plain host tensors come to the host a shard at a time (save_pretrained)
        elsewhere = {"device": self.w_blocks + self.w_outside if self.gpu else 0, "host": 0,
                     "cpu-offload": self.w_outside if self.gpu else 0,
                     "disk": self.w_blocks + (self.w_outside if self.gpu else 0)}[self.weights]
        if mode == "dense":
            p.add("disk", "output checkpoint", self.w_blocks + self.w_outside)
            p.add("host", "one shard brought to the host", min(self.shard, elsewhere))
            return p.parts
        compact = self.s.pruned_params * compact_bytes_per_weight(self.o, self.w)
        p.add("disk", "output checkpoint (compact; deflate: smaller)", compact + self.w_outside)
        # checkpoint/save.py: the encoded tensors of every pruned layer are built before the first shard is written;
        # an offloaded model's stored weights are all read first
        p.add("host", "encoded pruned layers", compact)
        p.add("host", "one layer being encoded", 2 * self.layer)
        if self.weights == "disk":
            p.add("host", "every offloaded weight, read back", self.w_blocks)
        if self.gpu and self.weights != "host":
            p.add("host", "one shard of unpruned tensors brought to the host", min(self.shard, self.w_outside))
        return p.parts

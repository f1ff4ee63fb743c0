"""The work of tests/test_distributed.py: prune a tiny LLaMA with each case and keep what this process ended with.

Run by the test under ``torchrun --nproc_per_node 2`` (``python distributed_worker.py OUT``: every process writes
``OUT/rank<r>.pt`` and logs every file it moved into place to ``OUT/writes-rank<r>.txt``), and called in the test's
own process for the one-process reference (:func:`run`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_models, under torchrun too

# the two pruners the issue names, with the MSP allocation; a tiny search (2 generations of 4 plans)
CASES = {
    "wanda-msp": dict(method="wanda", sparsity=0.6),
    "sparsegpt-msp": dict(method="sparsegpt", sparsity=0.5),
}
COMMON = dict(allocation="msp", fisher_samples=3, fitness_samples=2, fitness_seqlen=32, population_size=4,
              generations=2, seed=0)
#: 5 windows: an uneven share over 2 processes (3 + 2); 3 Fisher windows (2 + 1)
WINDOWS = 5


def calibration_windows() -> torch.Tensor:
    from tiny_models import calibration_ids

    return calibration_ids(WINDOWS, 32)


def run_case(case: str, out: Path, **options) -> dict:
    """Prune a tiny LLaMA with ``case``, save it to ``out/<case>``; its plan (layer -> target), search summary, Fisher
    traces, weights and run report."""
    from tiny_models import calibration_ids, tiny_model

    from optimum_msp import MSPConfig, MSPPruner

    pruner = MSPPruner(tiny_model("llama"))
    options = {"search_checkpoint": str(out / f"{case}-search.json"), **options}
    pruner.prune(MSPConfig(**CASES[case], **COMMON, **options), calibration=calibration_windows(),
                 fitness_ids=calibration_ids(2, 32, seed=1))
    pruner.save_pretrained(out / case)
    return {
        "targets": {name: layer.target.describe() for name, layer in pruner.plan.layers.items()},
        "search": pruner.plan.search,
        "sensitivity": {name: layer.sensitivity for name, layer in pruner.plan.layers.items()},
        "weights": {key: value.clone() for key, value in pruner.model.state_dict().items()},
        "report": pruner.report,
    }


#: the final prune's ways of running (``apply_targets``): sequential, fed by another plan, a statistics pass, and
#: sequential on a model offloaded to host memory (the pruned weights written to accelerate's weights map)
SPLIT_MODES = ("sequential", "restore", "offloaded")
#: the layer whose prune fails in :func:`failing_prune` (SparseGPT: its process prunes only part of the block)
FAILING = "model.layers.1.self_attn.q_proj"


def _split_setup(offloaded: bool = False):
    import accelerate
    from tiny_models import tiny_model

    from optimum_msp.modeling.blocks import select_linears
    from optimum_msp.modeling.sequential import BlockRunner
    from optimum_msp.plan import LayerTarget

    model = tiny_model("llama")
    if offloaded:
        model = accelerate.cpu_offload(model, execution_device="cpu")
    runner = BlockRunner(model)
    layers = [select_linears(block, f"{runner.block_prefix}.{i}") for i, block in enumerate(runner.blocks)]
    names = [name for block in layers for name in block]
    targets = {name: LayerTarget(sparsity=0.4 + 0.1 * (i % 3)) for i, name in enumerate(names)}
    return runner, layers, targets


def split_prunes() -> dict:
    """``apply_targets`` alone on a tiny LLaMA for Wanda and SparseGPT in every :data:`SPLIT_MODES`: the weights after
    it, the achieved sparsities, the statistics each block was pruned with, and the layers this process pruned
    (its ``prune_layer`` calls: name, target)."""
    from optimum_msp import apply
    from optimum_msp.modeling.offload import read_matrix
    from optimum_msp.pruners import get_pruner

    results = {}
    original = apply.prune_layer
    for method in ("wanda", "sparsegpt"):
        for mode in SPLIT_MODES:
            runner, layers, targets = _split_setup(offloaded=mode == "offloaded")
            pruned, seen = [], {}

            def counting(module, pruner, stats, target, device=None, name=""):
                pruned.append((name, target.sparsity))
                return original(module, pruner, stats, target, device, name)

            def keep(stats):
                seen.update({name: [getattr(stat, field).clone() for field in stat.STATE]
                             for name, stat in stats.items()})

            apply.prune_layer = counting
            try:
                achieved = apply.apply_targets(runner, layers, targets, get_pruner(method), calibration_windows(),
                                               on_statistics=keep, restore=mode == "restore")
            finally:
                apply.prune_layer = original
            results[method, mode] = {
                "weights": {name: read_matrix(module).clone() for block in layers for name, module in block.items()},
                "achieved": achieved, "pruned": pruned, "statistics": seen,
            }
    return results


def failing_prune() -> str:
    """The error a SparseGPT ``apply_targets`` raises here when the prune of :data:`FAILING` fails (on the process
    that prunes it)."""
    from optimum_msp import apply
    from optimum_msp.pruners import get_pruner

    runner, layers, targets = _split_setup()
    original = apply.prune_layer

    def failing(module, pruner, stats, target, device=None, name=""):
        if name == FAILING:
            raise ValueError(f"{name} cannot be pruned")
        return original(module, pruner, stats, target, device, name)

    apply.prune_layer = failing
    try:
        apply.apply_targets(runner, layers, targets, get_pruner("sparsegpt"), calibration_windows())
    except (ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {error}"
    finally:
        apply.prune_layer = original
    return "no error"


def run(out: Path) -> dict:
    """Every case (saved to ``out/<case>``, with a search checkpoint ``out/<case>-search.json``), the block-wise
    Fisher traces, and every batch of windows a pass ran through the model (``captured``)."""
    from tiny_models import tiny_model

    from optimum_msp.allocation.fisher import fisher_traces
    from optimum_msp.modeling.blocks import select_linears
    from optimum_msp.modeling.sequential import BlockRunner

    captured = []
    original = BlockRunner.capture

    def capture(self, input_ids, batch_size=1):
        captured.append(input_ids.clone())
        return original(self, input_ids, batch_size)

    BlockRunner.capture = capture
    try:
        results = {case: run_case(case, out) for case in CASES}
        # the other Fisher pass (block by block, as for offloaded models), uncached so that it computes here
        model = tiny_model("llama")
        runner = BlockRunner(model)
        layers = {}
        for index, block in enumerate(runner.blocks):
            layers.update(select_linears(block, f"{runner.block_prefix}.{index}"))
        results["blockwise_fisher"] = fisher_traces(model, layers, calibration_windows(), use_cache=False,
                                                    runner=runner, blockwise=True)
    finally:
        BlockRunner.capture = original
    results["captured"] = captured
    results["split"] = split_prunes()
    results["failing"] = failing_prune()
    return results


def _record_writes(log: Path) -> None:
    """Log every file or folder this process moves into place: all the library's writes end in an ``os.replace``
    (checkpoint folders, caches, the search checkpoint)."""
    original = os.replace

    def replace(source, destination, *args, **kwargs):
        with open(log, "a") as handle:
            handle.write(f"{destination}\n")
        return original(source, destination, *args, **kwargs)

    os.replace = replace


def main(out: Path) -> None:
    from optimum_msp import distributed

    torch.set_num_threads(1)
    rank = distributed.rank()
    log = out / f"writes-rank{rank}.txt"
    log.touch()
    _record_writes(log)
    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("optimum_msp").addHandler(handler)
    logging.getLogger("optimum_msp").setLevel(logging.INFO)
    with distributed.main_process_first():  # the main process writes, the others read what it wrote
        if distributed.is_main_process():
            time.sleep(0.5)  # without the wait, the others would surely read first
            (out / "first.txt").write_text("written by the main process")
        results = {"first": (out / "first.txt").read_text()}
    results.update(run(out))
    results["log"] = messages
    results["world_size"] = distributed.world_size()
    torch.save(results, out / f".rank{rank}.pt.tmp")
    os.rename(out / f".rank{rank}.pt.tmp", out / f"rank{rank}.pt")  # not logged: the test's own file


if __name__ == "__main__":
    main(Path(sys.argv[1]))

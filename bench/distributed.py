"""Data-parallel speed-up: the same prune of the bundled SmolLM2-135M on 1 and N processes, time per stage.

    python bench/distributed.py --processes 1 2 --threads 1 --rows wanda:uniform wanda:fisher
    python bench/distributed.py --table

Every (row, process count) runs as ``torchrun --standalone --nproc_per_node N bench/distributed.py --worker ROW ...``
(1 process included, so both go through the same launcher) with a fresh ``OPTIMUM_MSP_CACHE``: Fisher traces and
statistics are computed, never read from a cache. The model is loaded and the calibration windows drawn before the
clock starts; the times are those of ``MSPPruner.prune`` (its report's stages) on the main process, and the CPU
seconds of the prune, and of its final prune stage (``apply_targets``), on every process. Rank 0 appends one row to
``bench/results/distributed.jsonl``, with the plan's hash (the same plan on 1 and N processes) and the load average
around the run (the machine may be shared).

The final prune splits each block's layers between the processes (``optimum_msp.apply.SPLIT_LAYERS``); ``--no-split``
has every process prune every layer instead, to compare the two:

    python bench/distributed.py --processes 1 2 --threads 1 --rows sparsegpt:uniform
    python bench/distributed.py --processes 2 --threads 1 --rows sparsegpt:uniform --no-split

A row is ``method:allocation`` (``wanda:fisher``); ``msp`` rows run a small search (``--population-size``,
``--generations``), whose candidates are split across the processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, Timer, append_result, markdown_table, read_results  # noqa: E402

OUT = RESULTS / "distributed.jsonl"
ROOT = Path(__file__).resolve().parents[1]


def _config(args, row: str):
    from optimum_msp import MSPConfig

    method, allocation = row.split(":")
    search = dict(population_size=args.population_size, generations=args.generations, fitness_samples=2,
                  fitness_seqlen=args.seqlen) if allocation == "msp" else {}
    fisher = dict(fisher_samples=args.samples, fisher_seqlen=args.seqlen) if allocation in ("fisher", "msp") else {}
    return MSPConfig(method=method, sparsity=args.sparsity, allocation=allocation,
                     num_calibration_samples=args.samples, seqlen=args.seqlen, **fisher, **search)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from optimum_msp import MSPPruner, apply, distributed
    from optimum_msp import pruner as pruner_module

    torch.set_num_threads(args.threads)
    apply.SPLIT_LAYERS = not args.no_split
    final = Timer()
    final.wall = final.cpu = 0.0

    def timing(function):  # the final prune stage (statistics passes call apply_targets elsewhere)
        def timed(*positional, **keywords):
            with Timer() as once:
                result = function(*positional, **keywords)
            final.wall, final.cpu = final.wall + once.wall, final.cpu + once.cpu
            return result
        return timed

    # sequential (apply_targets), or after an MSP search with its statistics (prune_with_statistics)
    pruner_module.apply_targets = timing(pruner_module.apply_targets)
    pruner_module.prune_with_statistics = timing(pruner_module.prune_with_statistics)
    load_before = os.getloadavg()
    config = _config(args, args.worker)
    pruner = MSPPruner.from_pretrained(args.model)
    calibration = pruner.calibration(config)
    distributed.barrier()  # every process starts the clock together
    with Timer() as prune:
        pruner.prune(config, calibration=calibration.ids, fitness_ids=calibration.held_out(2, args.seqlen, 1)
                     if config.allocation == "msp" else None)
    per_process = [(prune.wall, prune.cpu, final.cpu)]
    if distributed.world_size() > 1:
        per_process = [None] * distributed.world_size()
        dist.all_gather_object(per_process, (prune.wall, prune.cpu, final.cpu))
    if not distributed.is_main_process():
        return
    report, allocation = pruner.report, pruner.report.get("allocation", {})
    targets = {name: layer.target.describe() for name, layer in pruner.plan.layers.items()}
    append_result(OUT, {
        "row": args.worker, "processes": distributed.world_size(), "backend": distributed.backend() or "none",
        "threads": args.threads, "split": not args.no_split, "samples": args.samples, "seqlen": args.seqlen, "sparsity": args.sparsity,
        "fisher_s": allocation.get("fisher_seconds"), "statistics_s": allocation.get("statistics_seconds"),
        "search_s": allocation.get("search_seconds"), "allocation_s": report["allocation_seconds"],
        "final_prune_s": report["prune_seconds"], "prune_wall_s": round(prune.wall, 2),
        "prune_cpu_s": [round(cpu, 2) for _wall, cpu, _final in per_process],
        "final_prune_cpu_s": [round(final_cpu, 2) for _wall, _cpu, final_cpu in per_process],
        "peak_rss_mb": report.get("peak_rss_mb"),
        "plan_sha": hashlib.sha256(json.dumps(targets, sort_keys=True).encode()).hexdigest()[:12],
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
    })


def launch(args, row: str, processes: int, model: str) -> None:
    with tempfile.TemporaryDirectory(prefix="msp-bench-cache-") as cache:
        env = dict(os.environ, OPTIMUM_MSP_CACHE=cache, OMP_NUM_THREADS=str(args.threads),
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   __file__, "--worker", row, "--model", model, "--threads", str(args.threads),
                   "--samples", str(args.samples), "--seqlen", str(args.seqlen), "--sparsity", str(args.sparsity),
                   "--population-size", str(args.population_size), "--generations", str(args.generations)]
        command += ["--no-split"] if args.no_split else []
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, env=env, check=True)


def table() -> str:
    latest = {}
    for row in read_results(OUT):
        # rows written before the final prune was split have no "split": every process pruned every layer
        split = "-" if row["processes"] == 1 else ("yes" if row.get("split", False) else "no")
        latest[(row["row"], row["samples"], row["seqlen"], row["threads"], row["processes"], split)] = row
    lines = []
    for key in sorted(latest):
        row = dict(latest[key])
        one = latest.get((*key[:4], 1, "-"))
        row["split"] = key[5]
        row["prune_cpu_max_s"] = max(row["prune_cpu_s"])
        row["final_prune_cpu_max_s"] = max(row["final_prune_cpu_s"]) if "final_prune_cpu_s" in row else None
        if one is not None:
            row["speed_up_wall"] = round(one["prune_wall_s"] / row["prune_wall_s"], 2)
            # a process per core: the busiest process's CPU time is the time to result on an idle machine
            row["speed_up_cpu"] = round(max(one["prune_cpu_s"]) / row["prune_cpu_max_s"], 2)
            row["same_plan"] = row["plan_sha"] == one["plan_sha"]
            if row["final_prune_cpu_max_s"] and "final_prune_cpu_s" in one:
                row["speed_up_final_cpu"] = round(max(one["final_prune_cpu_s"]) / row["final_prune_cpu_max_s"], 2)
        row["windows"] = f"{row['samples']}x{row['seqlen']}"
        row["load_1min"] = f"{row['load_before'][0]:.1f}-{row['load_after'][0]:.1f}"
        lines.append(row)
    return markdown_table(lines, ["row", "windows", "processes", "split", "fisher_s", "statistics_s", "search_s",
                                  "final_prune_s", "final_prune_cpu_max_s", "speed_up_final_cpu", "prune_wall_s",
                                  "prune_cpu_max_s", "speed_up_wall", "speed_up_cpu", "same_plan", "load_1min",
                                  "commit"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=["wanda:uniform", "wanda:fisher"])
    parser.add_argument("--processes", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows (and Fisher windows)")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--population-size", type=int, default=4)
    parser.add_argument("--generations", type=int, default=1)
    parser.add_argument("--no-split", action="store_true",
                        help="every process prunes every layer of the final prune (instead of its share)")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not args.table:
        from optimum_msp.modeling import resolve_model_path

        model = str(resolve_model_path(args.model))  # converted once, outside the fresh caches of the runs
        for row in args.rows:
            for processes in args.processes:
                launch(args, row, processes, model)
    print(table())


if __name__ == "__main__":
    main()

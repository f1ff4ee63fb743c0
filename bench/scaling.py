"""Memory and time of a prune as the model grows, held in memory or offloaded to disk.

Randomly initialised LLaMA-architecture models of about 135M, 500M and 1.1B parameters are built from configs
below and saved once in bf16 (memory and time do not depend on the weight values; quality numbers come from
SmolLM2 only, see allocation.py). Each row runs in its own process and records the peak resident memory of that
process (``ru_maxrss``), the time of each stage and the commit; rows are appended to bench/results/scaling.jsonl.

Calibration is random token ids (no tokenizer is involved): ``--samples`` windows of ``--seqlen`` tokens.

    python bench/scaling.py --threads 1 --rows 135m:wanda:uniform:memory 135m:wanda:uniform:disk
    python bench/scaling.py --threads 1 --rows 1.1b:sparsegpt:uniform:disk
    python bench/scaling.py --table
    python bench/scaling.py --threads 1 --eval-windows 2 --save dense --rows 135m:wanda:fisher:memory
    python bench/scaling.py --stages     # each stage's measured peak beside its estimate (rows that recorded them)

Each row also records the peak of every stage (``stage_peaks_mb``, see bench/stage_peaks.py); ``--eval-windows``
and ``--save`` add the evaluation (random windows of ``--seqlen`` tokens) and the save (to a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, append_result, markdown_table, read_results, run_rows, set_threads  # noqa

OUT = RESULTS / "scaling.jsonl"
MODELS = RESULTS / "scratch" / "models"  # built once, never committed (bench/results/scratch/ is ignored)
SIZES = {  # LLaMA configs: SmolLM2-135M's shape, a Qwen2-0.5B-like one, TinyLlama-1.1B's
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "500m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=32, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False),
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}
COLUMNS = ["size", "params_m", "method", "allocation", "where", "samples", "seqlen", "load_s", "allocation_s",
           "prune_s", "peak_rss_mb", "estimate_mb", "estimate/peak", "block_weights_mb", "calibration_mb", "threads",
           "commit"]


def latest(rows):
    """The latest row of each (size, method, allocation, where): a re-run supersedes the rows before it (the first
    row of each size also built its model in the same process, which its peak then included)."""
    kept = {}
    for row in rows:
        kept[(row["size"], row["method"], row["allocation"], row["where"], row["samples"], row["seqlen"])] = row
    order = {size: i for i, size in enumerate(SIZES)}
    return sorted(kept.values(), key=lambda r: (order[r["size"]], r["allocation"], r["method"], r["where"]))


def estimate_for(row: dict):
    """``optimum_msp.estimate`` of the same model and settings as ``row`` (CPU compute: host memory is all)."""
    from optimum_msp.estimate import estimate_memory

    config = dict(SIZES[row["size"]], dtype="bfloat16")
    return estimate_memory(config, method=row["method"], allocation=row["allocation"], sparsity=0.5,
                           num_calibration_samples=row["samples"], seqlen=row["seqlen"],
                           weights="disk" if row["where"] == "disk" else "device",
                           fisher_samples=min(2, row["samples"]), fisher_seqlen=min(128, row["seqlen"]),
                           population_size=4, generations=1, fitness_samples=2, fitness_seqlen=128,
                           evaluate=bool(row.get("eval_windows")), save=row.get("save"))


def with_estimate(row: dict) -> dict:
    """The row with the estimate's expected peak for the same model and settings, and the ratio."""
    mb = estimate_for(row).total / 2**20
    return dict(row, estimate_mb=round(mb), **{"estimate/peak": round(mb / row["peak_rss_mb"], 2)})


def stage_rows(rows):
    """One line per measured stage: its peak, the estimate's, and the ratio."""
    out = []
    for row in rows:
        if not row.get("stage_peaks_mb"):
            continue
        estimate = estimate_for(row)
        for stage, measured in row["stage_peaks_mb"].items():
            if stage not in estimate.stages or (stage == "fisher" and row["allocation_s"] < 1):
                continue  # (rows before the fresh cache read their Fisher traces from it: nothing was measured)
            mb = estimate.need(stage, "host") / 2**20
            out.append({"row": row["row"], "stage": stage, "peak_mb": measured, "estimate_mb": round(mb),
                        "estimate/peak": round(mb / measured, 2), "commit": row["commit"]})
    return out


def model_folder(size: str) -> Path:
    """The saved bf16 random model of ``size`` (built on first use)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = MODELS / size
    if not (folder / "config.json").is_file():
        config = LlamaConfig(max_position_embeddings=4096, **SIZES[size])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder)
    return folder


def run_row(row: str, args) -> None:
    import torch

    from optimum_msp import MSPConfig, MSPPruner

    from stage_peaks import StagePeaks, prune_stages

    set_threads(args.threads)
    # a fresh cache: Fisher traces and statistics cached by an earlier row would skip the stages measured here
    os.environ["OPTIMUM_MSP_CACHE"] = tempfile.mkdtemp(prefix="msp-cache-")
    stages = StagePeaks()
    measured = prune_stages(stages)
    size, method, allocation, where = row.split(":")
    folder = model_folder(size)
    kwargs = {}
    if where == "disk":  # every decoder block on disk; embeddings, final norm and head in memory
        import json

        config = json.loads((folder / "config.json").read_text())
        device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        device_map.update({f"model.layers.{i}": "disk" for i in range(config["num_hidden_layers"])})
        kwargs = dict(device_map=device_map, offload_folder=tempfile.mkdtemp(prefix="msp-offload-"))
    started = time.perf_counter()
    with stages.stage("load"):
        pruner = MSPPruner.from_pretrained(folder, **kwargs)
    load_s = time.perf_counter() - started
    model = pruner.model
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, vocab, (args.samples, args.seqlen), generator=generator)
    fitness = torch.randint(0, vocab, (2, 128), generator=generator)
    config = MSPConfig(method=method, sparsity=0.5, allocation=allocation, fisher_samples=min(2, args.samples),
                       fisher_seqlen=min(128, args.seqlen), population_size=4, generations=1)
    pruner.prune(config, calibration=calibration, fitness_ids=fitness)
    if args.eval_windows:
        from optimum_msp.evaluation.perplexity import window_nlls

        windows = torch.randint(0, vocab, (args.eval_windows, args.seqlen), generator=generator)
        with stages.stage("evaluation"):
            window_nlls(model, windows)
    if args.save:
        with tempfile.TemporaryDirectory(prefix="msp-save-") as output, stages.stage(f"save ({args.save})"):
            pruner.save_pretrained(Path(output) / "model", compact=False if args.save == "dense" else args.save)
    stage_peaks = stages.mb()
    stages.restore()
    hidden = model.config.hidden_size
    layer = model.model.layers[0]
    block_bytes = sum(p.numel() for p in layer.parameters()) * 2  # bf16
    result = {
        "row": row, "size": size, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6),
        "method": method, "allocation": allocation, "where": where, "samples": args.samples, "seqlen": args.seqlen,
        "load_s": round(load_s, 1), "allocation_s": pruner.report["allocation_seconds"],
        "prune_s": pruner.report["prune_seconds"],
        # the stage readings reset the high-water mark that ru_maxrss reports: the overall peak is their largest
        "peak_rss_mb": max(stage_peaks.values()), "stage_peaks_mb": stage_peaks, "measured_stages": measured,
        "eval_windows": args.eval_windows, "save": args.save,
        "block_weights_mb": round(block_bytes / 2**20), "threads": args.threads,
        # the calibration activations one block holds: the hidden states of every window, in the model's dtype
        "calibration_mb": round(args.samples * args.seqlen * hidden * 2 / 2**20),
        "report": pruner.report,
    }
    append_result(Path(args.output), result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=[f"{s}:{m}:uniform:{w}" for s in SIZES
                                                      for m in ("wanda", "sparsegpt") for w in ("memory", "disk")],
                        help="size:method:allocation:memory|disk")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(OUT))
    parser.add_argument("--eval-windows", type=int, default=0, help="evaluate this many random windows after the prune")
    parser.add_argument("--save", choices=["dense", "sparse", "deflate"], default=None,
                        help="save the pruned model (to a temporary folder) after the prune")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--stages", action="store_true", help="each stage's measured peak beside its estimate")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stages:
        print(markdown_table(stage_rows(latest(read_results(Path(args.output)))),
                             ["row", "stage", "peak_mb", "estimate_mb", "estimate/peak", "commit"]))
        return
    if args.table:
        print(markdown_table([with_estimate(row) for row in latest(read_results(Path(args.output)))], COLUMNS))
        return
    if args.single:
        run_row(args.single, args)
        return
    run_rows(__file__, args.rows, sys.argv[1:])
    print(markdown_table([with_estimate(row) for row in latest(read_results(Path(args.output)))], COLUMNS))


if __name__ == "__main__":
    main()

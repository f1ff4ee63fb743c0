"""The rows of bench/gpu_check.sh: SmolLM2 pruned on ``cuda`` in bf16, with times, peak CUDA memory and PPL.

Each row prunes with 8 calibration windows of 512 tokens (a smoke-sized run: the point is that every stage runs
on the GPU, not the quality), evaluates 4 test windows of 2048 tokens, and appends a JSON line to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import git_commit  # noqa: E402

ROWS = [("wanda", "uniform", "cuda"), ("sparsegpt", "uniform", "cuda"), ("wanda", "msp", "cuda"),
        ("sparsegpt", "msp", "cuda"), ("wanda", "uniform", "disk"),
        ("sparsegpt", "msp", "disk")]  # the memory-bounded search on blocks offloaded to disk, computed on the GPU


def run(model_name: str, method: str, allocation: str, where: str) -> dict:
    import torch

    from optimum_msp import MSPConfig, MSPPruner
    from optimum_msp.evaluation import perplexity

    torch.cuda.reset_peak_memory_stats()
    kwargs = {"dtype": "bfloat16"}
    if where == "disk":  # blocks on disk, computed on the GPU one at a time
        from transformers import AutoConfig

        from optimum_msp.modeling import resolve_model_path

        layers = AutoConfig.from_pretrained(resolve_model_path(model_name)).num_hidden_layers
        device_map = {"model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
        device_map.update({f"model.layers.{i}": "disk" for i in range(layers)})
        kwargs.update(device_map=device_map, offload_folder=tempfile.mkdtemp(prefix="msp-offload-"))
    else:
        kwargs.update(device_map={"": 0})
    started = time.perf_counter()
    pruner = MSPPruner.from_pretrained(model_name, device="cuda", **kwargs)
    load_s = time.perf_counter() - started
    config = MSPConfig(method=method, sparsity=0.5, allocation=allocation, num_calibration_samples=8, seqlen=512,
                       fisher_samples=4, fisher_seqlen=256, population_size=6, generations=2)
    started = time.perf_counter()
    pruner.prune(config)
    prune_s = time.perf_counter() - started
    row = {"method": method, "allocation": allocation, "where": where, "load_s": round(load_s, 1),
           "prune_s": round(prune_s, 1), "report": pruner.report,
           "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20),
           "achieved_sparsity": pruner.plan.achieved_sparsity}
    if where != "disk":
        row["ppl_4"] = perplexity(pruner.model, pruner.tokenizer, seqlen=2048, max_windows=4)
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            pruner.save_pretrained(Path(folder) / "compact", compact="sparse", plot=False)
            from transformers import AutoModelForCausalLM

            reloaded = AutoModelForCausalLM.from_pretrained(Path(folder) / "compact", device_map={"": 0})
            row["compact_save_load_s"] = round(time.perf_counter() - started, 1)
            row["compact_reload_ppl_4"] = perplexity(reloaded, pruner.tokenizer, seqlen=2048, max_windows=4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    for method, allocation, where in ROWS:
        row = {"commit": git_commit(), **run(args.model, method, allocation, where)}
        print(json.dumps(row))
        with open(args.output, "a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

"""Time a uniform prune through the public API (capture, statistics pass, pruning and pruned-output pass for every
block), to tell a code change from a machine change: run it from two checkouts of the library on the same machine,
in turn, and compare.

    python bench/uniform_prune_time.py --method sparsegpt --samples 8 --threads 2
    git worktree add /tmp/old 95cfd28 && PYTHONPATH=/tmp/old python bench/uniform_prune_time.py --samples 8 --threads 2

It prints one JSON line: which ``optimum_msp`` ran (its file), the settings, and the prune's wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.75)
    parser.add_argument("--samples", type=int, default=8, help="calibration windows of 2048 tokens")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    # not bench/common.py's set_threads: importing common imports this checkout's optimum_msp, whichever is timed
    torch.set_num_threads(args.threads)
    import optimum_msp  # the one first on sys.path: PYTHONPATH picks another checkout
    from optimum_msp import MSPConfig, MSPPruner

    pruner = MSPPruner.from_pretrained(args.model)
    config = MSPConfig(method=args.method, sparsity=args.sparsity, allocation="uniform",
                       num_calibration_samples=args.samples)
    wall, cpu = time.perf_counter(), time.process_time()
    pruner.prune(config)
    print(json.dumps({"library": os.path.dirname(optimum_msp.__file__), "method": args.method,
                      "sparsity": args.sparsity, "samples": args.samples, "threads": args.threads,
                      "wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}))


if __name__ == "__main__":
    main()

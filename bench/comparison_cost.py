"""What the report's comparison with OWL costs (``optimum-msp prune --compare-with owl``) on the bundled SmolLM2-135M.

Builds the allocation context a prune builds (32 x 2048 WikiText-2 validation windows, seed 0) and calls
:func:`optimum_msp.report.compare_allocations` twice: the first call computes the dense input norms OWL needs (unless
an earlier run cached them), the second reads them from the cache, as after an MSP-Wanda run. Point OPTIMUM_MSP_CACHE
at an empty folder (with a ``models`` link to the converted model) to measure the first call uncached.

    python bench/comparison_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import set_threads  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)

    from optimum_msp import MSPConfig, MSPPruner
    from optimum_msp.allocation import AllocationContext
    from optimum_msp.modeling.blocks import select_linears
    from optimum_msp.modeling.sequential import BlockRunner
    from optimum_msp.report import compare_allocations

    pruner = MSPPruner.from_pretrained(args.model)
    config = MSPConfig(method="wanda", sparsity=0.75, allocation="msp").resolved()
    runner = BlockRunner(pruner.model, config.block_name)
    layers = [select_linears(block, f"{runner.block_prefix}.{i}", config.targets, config.ignore)
              for i, block in enumerate(runner.blocks)]
    context = AllocationContext(pruner.model, layers, config.budget(), config.allocation_options(), None,
                                pruner.calibration(config), runner, config.seed, config.batch_size)
    for call in ("first call", "second call (statistics cached)"):
        wall, cpu = time.perf_counter(), time.process_time()
        compare_allocations(context, config, ("uniform", "owl"))
        print(f"{call}: {time.perf_counter() - wall:.1f} s wall, {time.process_time() - cpu:.1f} s CPU", flush=True)


if __name__ == "__main__":
    main()

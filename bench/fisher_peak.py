"""The Fisher pass's own working set, measured, beside the estimate's (``docs/scaling.md``).

One process per setting: load a bench model (bench/scaling.py builds them), touch every weight with a short
forward, reset the resident high-water mark, run the Fisher traces of one sequence of ``--seqlen`` tokens (no
cache), and print the peak above the resident size before it, with the estimate's Fisher terms.

    python bench/fisher_peak.py --size 135m --seqlen 128
    python bench/fisher_peak.py --size 135m --seqlen 512 --blockwise
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="135m")
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--blockwise", action="store_true")
    args = parser.parse_args()

    import torch

    from common import set_threads
    from scaling import SIZES, model_folder
    from stage_peaks import _hwm_kb, _reset

    from optimum_msp import MSPPruner
    from optimum_msp.allocation.fisher import fisher_traces
    from optimum_msp.estimate import estimate_memory
    from optimum_msp.modeling.blocks import select_linears
    from optimum_msp.modeling.sequential import BlockRunner

    set_threads(1)
    model = MSPPruner.from_pretrained(model_folder(args.size)).model
    runner = BlockRunner(model)
    layers = {}
    for index, block in enumerate(runner.blocks):
        layers.update(select_linears(block, f"{runner.block_prefix}.{index}", ["Linear"], []))
    ids = torch.randint(0, model.config.vocab_size, (1, args.seqlen), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids[:, :16])  # every weight resident before the base is read
    base = _rss_mb()
    _reset()
    fisher_traces(model, layers, ids, use_cache=False, runner=runner, blockwise=args.blockwise)
    measured = _hwm_kb() / 1024 - base
    estimate = estimate_memory(dict(SIZES[args.size], dtype="bfloat16"), allocation="fisher",
                               fisher_seqlen=args.seqlen, seqlen=args.seqlen,
                               weights="disk" if args.blockwise else "device")
    terms = {name: round(size / 2**20) for name, size in estimate.stages["fisher"]["host"].items()
             if name != "one block's weights"}  # a model in memory moves no block
    print(json.dumps({"size": args.size, "seqlen": args.seqlen, "blockwise": args.blockwise,
                      "measured_mb": round(measured), "estimate_mb": sum(terms.values()), "terms_mb": terms}))


if __name__ == "__main__":
    main()

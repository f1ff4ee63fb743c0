"""Save a pruned model densely and compactly, reload both with plain ``from_pretrained``, and compare.

* dense: an ordinary checkpoint (stock transformers loads it too); with ``optimum_msp`` imported the reload
  verifies every pruned layer against ``config.sparsity_plan``.
* compact: pruned layers stored as kept values + bitmask / N:M indices (needs ``optimum_msp`` to load);
  decompressed while loading, bit for bit.

    python examples/save_and_reload.py                         # SmolLM2-135M, magnitude 50 %, bf16
    python examples/save_and_reload.py --pattern 2:4 --output out/ckpts
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from optimum_msp import MSPPruner, PlanError
from optimum_msp.commands.arguments import add_config_arguments, config_from_args
from optimum_msp.checkpoint import save_compact, save_pruned


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output", help="folder for the checkpoints (default: a temporary folder)")
    add_config_arguments(parser)  # every MSPConfig field; magnitude (data-free) unless --method says otherwise
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    pruner = MSPPruner.from_pretrained(args.model)
    pruner.prune(config_from_args(args, defaults=dict(method="magnitude")))
    model = pruner.model.to(getattr(torch, args.dtype))

    root = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="msp-example-"))
    dense_dir, compact_dir = root / "dense", root / "compact"
    save_pruned(model, dense_dir)  # == model.save_pretrained, plus the marker that makes reloads verify
    save_compact(model, compact_dir)
    print(f"dense   checkpoint: {_size_mb(dense_dir):8.1f} MB  ({dense_dir})")
    print(f"compact checkpoint: {_size_mb(compact_dir):8.1f} MB  ({compact_dir}), "
          f"{_size_mb(compact_dir) / _size_mb(dense_dir):.3f}x")

    dense = AutoModelForCausalLM.from_pretrained(dense_dir)  # verified against the plan while loading
    compact = AutoModelForCausalLM.from_pretrained(compact_dir)  # decompressed, then verified
    same = all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), compact.state_dict().values()))
    ids = torch.randint(0, dense.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same_logits = torch.equal(dense(ids).logits, compact(ids).logits)
    print(f"identical weights: {same}, identical logits: {same_logits}")

    # a checkpoint whose weights break the plan is refused, naming the layer
    config = json.loads((dense_dir / "config.json").read_text())
    layer = next(iter(config["sparsity_plan"]["layers"]))
    config["sparsity_plan"]["layers"][layer].update(sparsity=0.99, achieved=0.99)
    forged = root / "forged"
    forged.mkdir(exist_ok=True)
    for path in dense_dir.iterdir():
        (forged / path.name).write_bytes(path.read_bytes())
    (forged / "config.json").write_text(json.dumps(config))
    try:
        AutoModelForCausalLM.from_pretrained(forged)
    except PlanError as error:
        print(f"forged plan refused: {error}")


if __name__ == "__main__":
    main()

"""What the verbs of the command line share: device flags, loading keywords, tables, the help layout."""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Iterable, List, Sequence

PROG = "optimum-msp"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions and examples keep their line breaks; flags show their defaults."""

    def _get_help_string(self, action):
        text = action.help or ""
        # the config flags say their defaults themselves ("(default: ...)"); flags without one have nothing to show
        if "(default" in text or action.default in (None, argparse.SUPPRESS) or action.default is False:
            return text
        return super()._get_help_string(action)


def add_verb(sub, name: str, summary: str, description: str, examples: Sequence[str]) -> argparse.ArgumentParser:
    """A verb's parser: ``summary`` for the list of verbs, ``description`` and ``examples`` for its ``--help``."""
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples) if examples else None
    return sub.add_parser(name, help=summary, description=textwrap.fill(description, width=100), epilog=epilog,
                          formatter_class=HelpFormatter)


def add_device_arguments(parser: argparse.ArgumentParser, compute_device: bool = True) -> None:
    group = parser.add_argument_group("device and memory")
    if compute_device:
        group.add_argument("--device", default=None,
                           help="where blocks are computed: cpu, cuda, cuda:N (default: where the model is loaded); "
                                "one block's weights there at a time")
    group.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                       help="dtype the weights are loaded, stored and saved in (default: auto, the checkpoint's own)")
    group.add_argument("--device-map", default=None,
                       help="transformers' device_map: auto, cpu, or a JSON object of module -> device / 'cpu' / "
                            "'disk' (default: the whole model on one device)")
    group.add_argument("--offload-folder", default=None,
                       help="folder for disk-offloaded weights (needed with 'disk' in --device-map; pruned weights "
                            "of offloaded layers are written there)")


def loading_kwargs(args: argparse.Namespace) -> dict:
    """``from_pretrained`` keywords from the device flags."""
    kwargs = {"dtype": args.dtype, "device": getattr(args, "device", None)}
    if args.device_map is not None:
        text = args.device_map
        if text.lstrip().startswith("{"):
            try:
                text = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"--device-map is not valid JSON ({error}); give auto, cpu, or a JSON object such "
                                 'as \'{"model.layers.20": "disk"}\'.') from None
        kwargs["device_map"] = text
    if args.offload_folder is not None:
        kwargs["offload_folder"] = args.offload_folder
    return kwargs


def set_threads(threads) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def table(header: List[str], rows: Iterable[Sequence], right: Iterable[int] = ()) -> str:
    """A plain-text table for the terminal (columns padded; ``right``: right-aligned column indices)."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
    right = set(right)

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
                         ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in rows])


def one_line(text: object) -> str:
    """A message on one line (errors of transformers and the Hub span several)."""
    return " ".join(str(text).split())

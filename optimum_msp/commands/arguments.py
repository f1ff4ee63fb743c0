"""Command-line flags for :class:`~optimum_msp.MSPConfig`, generated from the option classes.

The CLI, the bench scripts and the examples all take their config flags from here, so a field declared once
(:func:`optimum_msp.options.option`) has one flag, one help text and one default everywhere. Flags default to
"not given": a config file (``--config``) or the caller's own defaults fill the rest, then ``MSPConfig``'s.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Iterable, Optional

from ..configuration import MSPConfig, RunOptions, config_fields, parse_pattern
from ..options import FieldSpec
from ..presets import PRESETS, preset_values


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(spec: FieldSpec) -> str:
    default = "-" if spec.default is None else (" ".join(spec.default) or "none") if spec.is_list else spec.default
    text = spec.help if "(default" in spec.help else f"{spec.help} (default: {default})"  # some say it themselves
    return text.replace("%", "%%")  # argparse formats help with %


def _group_title(owner: type) -> str:
    if owner is RunOptions:
        return "what to prune, how much, on which data"
    doc = (owner.__doc__ or "").strip()
    if not doc or doc.startswith(owner.__name__ + "("):  # no docstring: dataclasses put the signature there
        return owner.__name__
    return f"{owner.__name__} ({doc.splitlines()[0]})"


def add_config_arguments(parser: argparse.ArgumentParser, exclude: Iterable[str] = (),
                         config_file: bool = True) -> None:
    """One flag per ``MSPConfig`` field (minus ``exclude``), grouped by the option class that declares it."""
    if config_file:
        parser.add_argument("--config", default=None,
                            help="an msp_config.json (or a folder holding one) to start from; flags override it")
        parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                            help="named settings on top of --config, under the flags: quality = twice the "
                            "search's fitness tokens, about twice its time (docs/msp.md)")
    groups: Dict[type, Any] = {}
    for name, spec in config_fields().items():
        if name in exclude:
            continue
        if spec.owner not in groups:
            groups[spec.owner] = parser.add_argument_group(_group_title(spec.owner))
        kwargs: Dict[str, Any] = dict(dest=name, default=None, help=_help(spec), metavar=name.upper())
        if spec.kind is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
            kwargs.pop("metavar")
        else:
            kwargs["type"] = spec.kind
            if spec.choices:
                kwargs.update(choices=spec.choices, metavar=None)
            if spec.is_list:
                kwargs["nargs"] = "+"
        groups[spec.owner].add_argument(_flag(name), **kwargs)


def config_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """The config fields given on the command line (name -> value)."""
    return {name: getattr(args, name) for name in config_fields() if getattr(args, name, None) is not None}


def config_from_args(args: argparse.Namespace, defaults: Optional[Dict[str, Any]] = None) -> MSPConfig:
    """``MSPConfig`` from ``defaults`` (the caller's), then ``--config`` (if any), then ``--preset``, then the flags
    given: each later one wins."""
    values: Dict[str, Any] = dict(defaults or {})
    if getattr(args, "config", None):
        values.update(MSPConfig.from_pretrained(args.config).to_dict())
    if getattr(args, "preset", None):
        values.update(preset_values(args.preset))
    given = config_overrides(args)
    if given.get("pattern") is not None and parse_pattern(given["pattern"])[0] == "n:m":
        # an N:M pattern implies its sparsity and M: a file's (for its own pattern) must not contradict it
        for implied in ("sparsity", "m"):
            values.pop(implied, None)
    values.update(given)
    return MSPConfig.from_dict(values)

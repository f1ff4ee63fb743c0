"""What a machine offers: the compute device and accelerate-style ``max_memory`` (``cuda:0=80GiB,cpu=200GiB``)."""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Union

GIB = 2**30
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]+)\s*$")
_EXAMPLE = "e.g. cuda:0=80GiB,cpu=200GiB,disk=1TB"


def normal_device(device: Union[str, int, None]) -> str:
    """``"cpu"`` or ``"cuda:N"`` (``"cuda"`` is ``cuda:0``, torch's default device)."""
    text = "cpu" if device is None else str(device).strip().lower()
    if text == "cuda" or text.isdigit():
        return f"cuda:{0 if text == 'cuda' else int(text)}"
    if text == "cpu" or re.fullmatch(r"cuda:\d+", text):
        return "cpu" if text == "cpu" else f"cuda:{int(text[5:])}"
    raise ValueError(f"device {device!r} is not cpu, cuda or cuda:N: the estimate knows these compute devices.")


def parse_size(text: Union[str, int, float], entry: str = "") -> int:
    """Bytes of ``"80GiB"`` / ``"1.5TB"`` (GiB/MiB: powers of 2; GB/MB: of 10, as accelerate reads them); an
    ``int`` is bytes. ``entry`` names the ``max_memory`` entry in errors."""
    where = f"max_memory entry {entry!r}" if entry else f"size {text!r}"
    if isinstance(text, bool):
        raise ValueError(f"{where}: a size must be a number of bytes or a string like '80GiB'.")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"{where}: a size cannot be negative.")
        return int(text)
    match = _SIZE.match(str(text))
    if match is None:
        if re.fullmatch(r"\s*\d+(\.\d*)?\s*", str(text)):
            raise ValueError(f"{where}: {text!r} has no unit; write it with one, e.g. {text.strip()}GiB.")
        raise ValueError(f"{where}: {text!r} is not a size; write a number and a unit (GiB, GB, MiB, ...).")
    number, unit = match.groups()
    if unit.lower() not in _UNITS:
        raise ValueError(f"{where}: unknown unit {unit!r}; use one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB.")
    return int(float(number) * _UNITS[unit.lower()])


def _resource(key: Any, entry: str) -> str:
    text = str(key).strip().lower()
    if text in ("cpu", "disk"):
        return text
    try:
        return normal_device(text)
    except ValueError:
        raise ValueError(f"max_memory entry {entry!r}: unknown device {str(key).strip()!r}; use cpu (host memory), "
                         f"disk, cuda:N or N (a GPU index) ({_EXAMPLE}).") from None


def parse_max_memory(value: Union[str, Mapping[Any, Any], None]) -> Dict[str, int]:
    """``{"cpu" | "disk" | "cuda:N": bytes}`` from ``"cuda:0=80GiB,cpu=200GiB,disk=1TB"`` or from accelerate's
    ``max_memory`` dict (``{0: "80GiB", "cpu": "200GiB"}``; integer values are bytes). Errors name the entry."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        items = [(key, size, f"{key}={size}") for key, size in value.items()]
    else:
        items = []
        for entry in (part.strip() for part in str(value).split(",")):
            if not entry:
                continue
            key, sep, size = entry.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"max_memory entry {entry!r} is not DEVICE=SIZE ({_EXAMPLE}).")
            items.append((key, size, entry))
    budget: Dict[str, int] = {}
    for key, size, entry in items:
        resource = _resource(key, entry)
        if resource in budget:
            raise ValueError(f"max_memory entry {entry!r}: {resource} is given twice.")
        budget[resource] = parse_size(size, entry)
    if not budget:
        raise ValueError(f"max_memory is empty; give DEVICE=SIZE entries ({_EXAMPLE}).")
    return budget


def check_devices(budget: Mapping[str, int], device: str) -> None:
    """Refuse a budget for a GPU the run does not compute on: the estimate models one compute device."""
    for resource in budget:
        if resource.startswith("cuda") and resource != device:
            raise ValueError(f"max_memory names {resource}, but blocks are computed on {device}: pass "
                             f"--device {resource} (device=), or drop that entry (one compute device is modelled).")


def format_gib(size: Optional[int]) -> str:
    return "-" if size is None else f"{size / GIB:.2f}"

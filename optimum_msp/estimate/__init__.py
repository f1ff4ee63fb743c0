"""Know before you run: the expected peak device memory, host memory and disk of each stage of a prune, from the
model's ``config.json`` and the settings, and whether it fits what the machine offers.

The model is never loaded. A run holds, for its whole length, the runtime and the weights where they are kept
(``weights=``: on the compute device, on the host, offloaded by accelerate to host memory or to disk); each stage
adds its own working set on top: load, input capture, Fisher (whole-model or block-wise), OWL's or the search's
statistics, the MSP search (the memory-bounded design: a dense model with candidate weights substituted per
linear, statistics and spilled bank entries in a work folder on disk, an LRU bank of ``search_bank_mb`` and a
hidden-state cache of ``search_cache_mb``), the final sequential prune, the evaluation and the save.

``docs/scaling.md`` gives every formula and compares them with measured peaks.

>>> estimate = estimate_memory(config_dict, method="sparsegpt", allocation="msp", device="cuda:0",
...                            weights="disk", max_memory="cuda:0=80GiB,cpu=64GiB,disk=500GB")
>>> print(estimate.summary()); estimate.fits
"""

from .budget import GIB, normal_device, parse_max_memory, parse_size
from .shape import ModelShape
from .stages import (CUDA_CONTEXT_BYTES, PLACEMENTS, RUNTIME_BYTES, Estimate,
                     compact_bytes_per_weight, estimate_memory, visited_levels)

__all__ = ["CUDA_CONTEXT_BYTES", "Estimate", "GIB", "ModelShape", "PLACEMENTS", "RUNTIME_BYTES",
           "compact_bytes_per_weight", "estimate_memory", "normal_device", "parse_max_memory", "parse_size",
           "visited_levels"]

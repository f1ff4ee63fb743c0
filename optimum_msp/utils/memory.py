"""Process-memory helpers for loading big checkpoints on Linux: give back file pages and freed heap.

Both are best-effort and no-ops where unsupported (not Linux, not a file mapping).
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

_MADV_DONTNEED = 4  # Linux
_libc = None


def release_file_pages(tensor: torch.Tensor, suffix: str = ".safetensors") -> int:
    """Drop the resident pages of a consumed tensor that is a view into a mapped ``*.safetensors`` file.

    The loader maps the checkpoint privately and read-only in practice, so its pages are clean copies of the
    file: ``madvise(MADV_DONTNEED)`` gives them back and a later read would fault them in again from the file.
    Without this the compact values and masks, once decoded, stay resident until the whole file is unmapped
    (the embeddings are views into the same mapping), on top of the decoded weights. Only whole pages inside
    the tensor are released (neighbouring tensors share the edge pages), and only when ``/proc/self/maps``
    shows the address inside a mapping of such a file (never anonymous memory, whose pages would be zeroed).
    Returns the bytes released; 0 where unsupported (not Linux) or not applicable.
    """
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or tensor.numel() == 0:
        return 0
    start = tensor.data_ptr()
    stop = start + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, stop // page * page
    if last <= first or not _inside_file_mapping(first, last, suffix):
        return 0
    if _c_library().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) != 0:
        return 0
    return last - first


def trim_heap() -> None:
    """Give freed heap pages back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Decoding frees temporaries of up to a layer's size; glibc keeps such blocks in its heap and, as live decoded
    weights interleave with them, cannot return them: the load's peak then varied by tens of MB between runs.
    Trimming after each layer costs well under a millisecond and makes the peak repeatable.
    """
    if sys.platform.startswith("linux"):
        trim = getattr(_c_library(), "malloc_trim", None)
        if trim is not None:
            trim(0)


def _c_library():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # the running process: libc is loaded already
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc


def _inside_file_mapping(first: int, last: int, suffix: str) -> bool:
    try:
        with open("/proc/self/maps") as handle:
            for line in handle:
                fields = line.split(maxsplit=5)
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= first and last <= high:
                    return len(fields) == 6 and fields[5].strip().endswith(suffix)
    except OSError:
        return False
    return False



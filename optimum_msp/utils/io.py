"""Atomic folder writes: a reader never sees a half-written checkpoint."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union


@contextlib.contextmanager
def atomic_directory(target: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; move it into place only if the block succeeds.

    The temporary folder lives in the same parent so the final ``rename`` stays on one file system.
    An existing ``target`` is replaced as a whole (its old content is removed after the swap).
    """
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, retired / target.name)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)

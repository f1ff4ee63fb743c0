"""Atomic folder writes: a reader never sees a half-written checkpoint, and a save never deletes files it did not write.

Everything happens in the target's parent folder, so each move is a ``rename`` on one file system:

- ``.<name>.tmp-*``: a staging folder being written; its ``.msp-owner`` file names the writer (host and PID) so that a
  later save can tell a dead writer's leftovers (removed) from a live one's (kept);
- ``.<name>.old-*``: holds a replaced checkpoint (as ``<name>``) between the two renames of a swap; deleted right after;
- a lock file in the library's cache (``<cache>/locks/``, keyed by the target's path) serialises swaps and clean-ups
  between processes. It is left in place (deleting a lock file another process may be waiting on would let two
  processes hold the lock), and kept out of the user's folder.

Recovery: a process killed between the two renames of a swap leaves ``<name>`` missing and one ``.<name>.old-*``
holding the previous, complete checkpoint. The next :func:`atomic_directory` call for that target moves it back
before doing anything else (and :func:`check_output_directory` already treats it as the target's content).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Union

from filelock import FileLock

from .paths import cache_dir

__all__ = ["OutputExistsError", "atomic_directory", "check_output_directory", "write_text_atomically"]

logger = logging.getLogger(__name__)

OWNER_FILE = ".msp-owner"
# A staging folder whose writer cannot be checked (another host, no owner file) is stale once untouched this long.
STALE_AFTER_S = 3600.0

PathLike = Union[str, os.PathLike]
Replaceable = Callable[[Path], bool]


class OutputExistsError(FileExistsError):
    """The output path holds something a save would destroy; nothing was written or deleted."""


def check_output_directory(target: PathLike, overwrite: bool = False,
                           replaceable: Optional[Replaceable] = None) -> Path:
    """Raise now if saving to ``target`` would fail or destroy files; return it resolved. Writes nothing.

    Cheap, so a command can call it before a long computation. Accepted: a missing or empty folder, or (with
    ``overwrite=True``) a folder that ``replaceable(path)`` recognises as a previous output; ``replaceable=None``
    accepts any folder. Raises :class:`OutputExistsError` for a file or a non-empty folder that may not be
    replaced, :class:`NotADirectoryError` when a parent is a file, :class:`PermissionError` when the nearest
    existing parent is not writable.
    """
    target = _resolve(target)
    _check_location(target)
    _check_content(target, overwrite, replaceable)
    return target


@contextlib.contextmanager
def atomic_directory(target: PathLike, overwrite: bool = False,
                     replaceable: Optional[Replaceable] = None) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; move it into place only if the block succeeds.

    The checks of :func:`check_output_directory` run first, so a refused save raises before the block and
    deletes nothing. An empty existing folder is kept and filled; a replaceable one is swapped for the new content
    (never left missing, even if the swap fails). The saved folder gets the permissions the umask allows. With
    concurrent saves to one target the last to finish wins (with ``overwrite=True``; otherwise it is refused).
    """
    target = _resolve(target)
    _check_location(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if _leftovers(target, "tmp") or _leftovers(target, "old"):
        with _lock(target):
            _tidy(target)  # first, so that the checks below see a restored checkpoint
    _check_content(target, overwrite, replaceable)

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        (staging / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700; the saved folder should follow the umask
        yield staging
        with _lock(target):
            _check_content(target, overwrite, replaceable)  # another process may have saved here meanwhile
            (staging / OWNER_FILE).unlink(missing_ok=True)
            _swap(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_text_atomically(path: PathLike, text: str) -> Path:
    """Replace the file ``path`` with ``text`` whole: written beside it under a temporary name, then renamed, so
    that a reader sees the old file or the new one, never a part (a report or model card rewritten in place)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:  # permissions follow the umask, as for any new file
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------------------- checks
def _resolve(target: PathLike) -> Path:
    path = Path(target).expanduser().resolve()
    if not path.name:
        raise ValueError(f"Cannot save to {path}: choose a folder inside it.")
    return path


def _check_location(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"Cannot save to {target}: it is a file. Choose an empty or new folder.")
    for parent in target.parents:  # nearest first
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"Cannot save to {target}: {parent} is a file, not a folder.")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(f"Cannot save to {target}: {parent} is not writable.")
            return


def _check_content(target: Path, overwrite: bool, replaceable: Optional[Replaceable]) -> None:
    existing = target if target.is_dir() else _interrupted_swap(target)
    if existing is None or not any(existing.iterdir()):
        return
    if not overwrite:
        raise OutputExistsError(
            f"{target} already exists and is not empty. Choose an empty or new folder, "
            "or pass overwrite=True (--overwrite) to replace a previous checkpoint."
        )
    if replaceable is not None and not replaceable(existing):
        raise OutputExistsError(
            f"Not overwriting {target}: it does not look like a previous checkpoint, so its files are kept. "
            "Choose an empty or new folder."
        )


# ------------------------------------------------------------------------------------------- swap and clean-up
def _lock(target: Path) -> FileLock:
    # in the library's cache, not beside the output: a user's folder gets nothing the product did not mean to write
    key = hashlib.sha256(str(target).encode()).hexdigest()[:24]
    folder = cache_dir() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / f"{key}.lock"))


def _swap(staging: Path, target: Path) -> None:
    """Move ``staging``'s content to ``target``. Called with the target's lock held."""
    if not target.exists():
        os.replace(staging, target)
    elif not any(target.iterdir()):
        # Keep the existing folder (it may be a mount point, which cannot be renamed over, or a shell's working
        # directory) and move the files in; config.json last, as loaders take it as the sign of a complete folder.
        for entry in sorted(staging.iterdir(), key=lambda entry: entry.name == "config.json"):
            os.replace(entry, target / entry.name)
        staging.rmdir()
    else:
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, retired / target.name)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(retired / target.name, target)  # never leave the final path missing
            retired.rmdir()
            raise
        shutil.rmtree(retired, ignore_errors=True)


def _leftovers(target: Path, kind: str) -> List[Path]:
    """This target's ``.<name>.tmp-*`` or ``.<name>.old-*`` folders."""
    prefix = f".{target.name}.{kind}-"
    with contextlib.suppress(FileNotFoundError):
        return sorted(path for path in target.parent.iterdir() if path.name.startswith(prefix) and path.is_dir())
    return []


def _interrupted_swap(target: Path) -> Optional[Path]:
    """The previous checkpoint of a swap killed between its two renames (``target`` missing), if unambiguous."""
    if target.exists():
        return None
    candidates = [retired / target.name for retired in _leftovers(target, "old") if (retired / target.name).is_dir()]
    return candidates[0] if len(candidates) == 1 else None


def _tidy(target: Path) -> None:
    """Restore an interrupted swap, delete retired checkpoints and stale staging folders. Needs the lock held:
    swaps happen under it, so any ``.old-*`` seen here belongs to a save that died."""
    previous = _interrupted_swap(target)
    if previous is not None:
        logger.warning("Restoring %s from %s: a save was interrupted while replacing it", target, previous.parent)
        os.replace(previous, target)
    retired = _leftovers(target, "old")
    if target.exists():
        for folder in retired:  # a dead save's previous checkpoint, already replaced by its new one
            logger.info("Removing %s, left by an interrupted save", folder)
            shutil.rmtree(folder, ignore_errors=True)
    elif retired:
        logger.warning("%s is missing and %d folders %s may hold it; keeping them, restore one by hand",
                       target, len(retired), ", ".join(str(folder) for folder in retired))
    for folder in _leftovers(target, "tmp"):
        if _is_stale(folder):
            logger.info("Removing %s, left by an interrupted save", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _is_stale(staging: Path) -> bool:
    """Whether a staging folder's writer is gone. A live writer on this host is never stale: a reused PID only
    makes a leftover linger, while the age rule alone could delete a slow save in progress."""
    try:
        host, pid = (staging / OWNER_FILE).read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        host, pid = None, 0
    if host == socket.gethostname() and pid > 0:
        return not _alive(pid)
    try:
        return time.time() - staging.stat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    # Elsewhere the umask can only be read by setting it. Racy: a file another thread creates between these two
    # calls gets the temporary 022 mask; accepted, as this only runs where /proc is missing.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

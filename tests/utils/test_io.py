"""atomic_directory / check_output_directory: refuse to destroy folders, follow the umask, survive crashes and races."""

import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# The module, not its names: each test then fails on its own when an API is missing.
from optimum_msp.utils import io


def _checkpoint(folder: Path, tag: str = "old") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"sparsity_plan": {}}')
    (folder / "weights.bin").write_text(tag)
    return folder


def _is_checkpoint(path: Path) -> bool:
    return "sparsity_plan" in (path / "config.json").read_text() if (path / "config.json").is_file() else False


def _hidden(parent: Path):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_non_empty_folder_is_refused_and_kept(tmp_path):
    target = tmp_path / "models"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")

    with pytest.raises(io.OutputExistsError, match="overwrite") as error:
        with io.atomic_directory(target) as staging:
            (staging / "config.json").write_text("{}")

    assert isinstance(error.value, FileExistsError) and str(target) in str(error.value)
    assert (target / "thesis.tex").read_text() == "years of work"
    assert not (target / "config.json").exists()
    assert _hidden(tmp_path) == []


def test_empty_folder_is_kept_and_filled(tmp_path):
    # An existing empty folder may be a mount point (cannot be renamed over) or a shell's working directory
    # (`--output .`): the save fills that very folder rather than replacing it.
    empty = tmp_path / "empty"
    empty.mkdir()
    inode = empty.stat().st_ino
    for target in (empty, tmp_path / "new" / "model"):
        with io.atomic_directory(target) as staging:
            (staging / "config.json").write_text("{}")
        assert sorted(p.name for p in target.iterdir()) == ["config.json"]  # no owner file left in the result
    assert empty.stat().st_ino == inode
    assert _hidden(tmp_path) == [] and _hidden(tmp_path / "new") == []


def test_overwrite_replaces_a_previous_checkpoint(tmp_path):
    target = _checkpoint(tmp_path / "out")

    with io.atomic_directory(target, overwrite=True, replaceable=_is_checkpoint) as staging:
        _checkpoint(staging, tag="new")

    assert (target / "weights.bin").read_text() == "new"
    assert _hidden(tmp_path) == []


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    target = tmp_path / "home"
    target.mkdir()
    (target / "notes.txt").write_text("mine")

    with pytest.raises(io.OutputExistsError, match="does not look like a previous checkpoint"):
        with io.atomic_directory(target, overwrite=True, replaceable=_is_checkpoint) as staging:
            _checkpoint(staging, tag="new")

    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "mine"
    assert _hidden(tmp_path) == []


def test_output_under_a_file_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "model.safetensors"
    blocker.write_text("weights")

    with pytest.raises(NotADirectoryError, match="model.safetensors"):
        io.check_output_directory(blocker / "out")
    with pytest.raises(io.OutputExistsError, match="is a file"):
        io.check_output_directory(blocker)
    with pytest.raises(io.OutputExistsError):
        io.check_output_directory(_checkpoint(tmp_path / "ckpt"))

    work = []
    with pytest.raises(NotADirectoryError):
        with io.atomic_directory(blocker / "out"):
            work.append("pruned")
    assert work == [] and blocker.read_text() == "weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "model.safetensors"]  # the check wrote nothing


def test_saved_folder_follows_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with io.atomic_directory(tmp_path / "out") as staging:
            (staging / "config.json").write_text("{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "config.json").stat().st_mode & 0o777 == 0o644


def test_stale_staging_of_a_dead_writer_is_removed_and_a_live_one_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = tmp_path / ".out.tmp-dead1234"
    stale.mkdir()
    (stale / "model.safetensors").write_text("half")
    (stale / ".msp-owner").write_text(f"{host} {int(dead.stdout)}\n")
    live = tmp_path / ".out.tmp-live5678"
    live.mkdir()
    (live / ".msp-owner").write_text(f"{host} {os.getpid()}\n")
    other = tmp_path / ".other.tmp-dead9999"  # another target's: not ours to judge
    other.mkdir()
    (other / ".msp-owner").write_text(f"{host} {int(dead.stdout)}\n")

    with io.atomic_directory(tmp_path / "out") as staging:
        (staging / "config.json").write_text("{}")

    assert not stale.exists()
    assert live.is_dir() and other.is_dir()
    assert (tmp_path / "out" / "config.json").is_file()


def test_interrupted_swap_is_restored(tmp_path):
    # A save killed between its two renames: the final path is missing, the previous checkpoint is in .old-*.
    target = tmp_path / "out"
    _checkpoint(tmp_path / ".out.old-abcd1234" / "out", tag="previous")

    with pytest.raises(io.OutputExistsError):  # the check sees the previous checkpoint as the target's content
        io.check_output_directory(target)
    with pytest.raises(io.OutputExistsError):
        with io.atomic_directory(target):
            pass

    assert (target / "weights.bin").read_text() == "previous"
    assert _hidden(tmp_path) == []


@pytest.mark.parametrize("where", ["block", "swap"])
def test_failure_keeps_the_old_content_and_leaves_no_staging(tmp_path, monkeypatch, where):
    target = _checkpoint(tmp_path / "out")
    if where == "swap":  # the second rename (staging -> target) fails
        real_replace = os.replace

        def replace(source, destination):
            if ".tmp-" in str(source) and Path(destination) == target:
                raise OSError("disk unplugged")
            return real_replace(source, destination)

        monkeypatch.setattr(io.os, "replace", replace)

    with pytest.raises((RuntimeError, OSError)):
        with io.atomic_directory(target, overwrite=True, replaceable=_is_checkpoint) as staging:
            _checkpoint(staging, tag="new")
            if where == "block":
                raise RuntimeError("out of memory")

    assert (target / "weights.bin").read_text() == "old"
    assert _hidden(tmp_path) == []


def _save(target, tag, overwrite, rounds, barrier, results):
    try:
        for _ in range(rounds):
            with io.atomic_directory(target, overwrite=overwrite, replaceable=_is_checkpoint) as staging:
                for index in range(20):
                    (staging / f"shard-{index}.bin").write_text(tag)
                _checkpoint(staging, tag=tag)
                barrier.wait(timeout=30)  # both writers finish together: their swaps race
        results.put((tag, "saved"))
    except BaseException as error:  # noqa: BLE001 (reported to the parent)
        results.put((tag, type(error).__name__))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overwrite", [False, True])
def test_concurrent_saves_to_one_target(tmp_path, overwrite):
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    target = tmp_path / "out"
    rounds = 5 if overwrite else 1  # without overwrite the second round is refused before any writing
    workers = [context.Process(target=_save, args=(target, tag, overwrite, rounds, barrier, results)) for tag in "ab"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    outcomes = dict(results.get(timeout=5) for _ in workers)

    if overwrite:  # the later one wins
        assert outcomes == {"a": "saved", "b": "saved"}
    else:  # the later one is refused cleanly, not with a raw OSError
        assert sorted(outcomes.values()) == ["OutputExistsError", "saved"]
    tags = {path.read_text() for path in target.iterdir() if path.name != "config.json"}
    assert len(tags) == 1 and len(list(target.iterdir())) == 22  # one writer's complete folder
    assert _hidden(tmp_path) == []

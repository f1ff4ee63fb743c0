"""Data-parallel runs (optimum_msp.distributed): the pure helpers, and 2 gloo processes against one.

The two-process tests launch ``torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py`` once (one thread
per process; most of its time is two Python processes importing torch and transformers) and compare what each
process ended with to a one-process run of the same work in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from optimum_msp import distributed
from optimum_msp.statistics import InputNorms

import distributed_worker as worker

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# ------------------------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("count", [1, 2, 5, 8, 13])
@pytest.mark.parametrize("processes", [1, 2, 3, 4])
def test_shards_cover_every_window_once_in_order(count, processes):
    windows = torch.arange(count * 3).reshape(count, 3)
    if count < processes:
        with pytest.raises(ValueError, match="num_calibration_samples"):
            distributed.shard(windows, processes=processes, index=0)
        parts = [distributed.shard(windows, allow_empty=True, processes=processes, index=i) for i in range(processes)]
    else:
        parts = [distributed.shard(windows, processes=processes, index=i) for i in range(processes)]
    # contiguous slices in rank order: their concatenation is the whole set, each window once
    assert torch.equal(torch.cat(parts), windows)
    sizes = [len(part) for part in parts]
    assert sizes == distributed.share(count, processes) and max(sizes) - min(sizes) <= 1
    # the same on every call (every process computes its own slice independently)
    again = [distributed.shard(windows, allow_empty=True, processes=processes, index=i) for i in range(processes)]
    assert all(torch.equal(a, b) for a, b in zip(parts, again))


def test_shard_of_a_sequence():
    assert distributed.shard(list("abcde"), processes=2, index=0) == list("abc")
    assert distributed.shard(list("abcde"), processes=2, index=1) == list("de")


def test_one_process_is_the_plain_case():
    """No launcher: no process group is made, and every helper hands its argument back untouched."""
    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1"
    assert (distributed.world_size(), distributed.rank(), distributed.is_main_process()) == (1, 0, True)
    assert distributed.backend() is None
    windows = torch.zeros(3, 4)
    assert distributed.shard(windows) is windows
    values = {"b": 1.5, "a": 2.0}
    assert distributed.reduce_values(values) is values
    tensor = torch.ones(3)
    assert distributed.all_reduce_(tensor) is tensor and torch.equal(tensor, torch.ones(3))
    assert distributed.all_true(True) and not distributed.all_true(False)
    stat = InputNorms(4)
    stat.add_batch(torch.ones(2, 4))
    distributed.reduce_statistics({"layer": stat})
    assert stat.tokens == 2 and torch.equal(stat.sum_squares, torch.full((4,), 2.0, dtype=torch.float64))
    order = []
    with distributed.main_process_first():
        order.append("body")
    distributed.barrier()
    assert order == ["body"] and distributed.process_device("cuda:1") == "cuda:1"
    assert not dist.is_initialized()


def test_shares_are_logged_and_checked_before_any_work():
    line = distributed.describe_shares({"calibration windows": 5, "Fisher windows": 3})
    assert line.startswith("Data-parallel run on 1 processes") and "[5]" in line and "[3]" in line


def test_a_process_without_a_calibration_window_is_refused_before_any_work(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    with pytest.raises(ValueError, match="3 calibration windows cannot be split across 4 processes"):
        distributed.describe_shares({"calibration windows": 3})
    line = distributed.describe_shares({"calibration windows": 9, "Fisher windows": 2})
    assert "calibration windows per process [3, 2, 2, 2]" in line and "Fisher windows per process [1, 1, 0, 0]" in line


# ------------------------------------------------------------------------------------------- two processes

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


def _launch(out: Path, cache: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPTIMUM_MSP_CACHE=str(cache),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "distributed_worker.py"), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(f"torchrun failed ({done.returncode}):\n{done.stderr[-6000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """What each of 2 processes ended with, and the same work in one process (caches, folders kept apart)."""
    from optimum_msp.allocation import cache

    root = tmp_path_factory.mktemp("distributed")
    (root / "two").mkdir()
    _launch(root / "two", root / "two-cache")
    ranks = [torch.load(root / "two" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    (root / "one").mkdir()
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cache, "cache_dir", lambda: root / "one-cache")
        torch.set_num_threads(1)
        try:
            reference = worker.run(root / "one")
        finally:
            torch.set_num_threads(threads)
    return root, reference, ranks


@needs_gloo
def test_two_processes_agree_with_each_other_bit_for_bit(runs):
    _root, _reference, (first, second) = runs
    assert first["world_size"] == second["world_size"] == 2
    for case in worker.CASES:
        assert first[case]["targets"] == second[case]["targets"]
        assert first[case]["search"] == second[case]["search"]
        assert all(torch.equal(first[case]["weights"][key], second[case]["weights"][key])
                   for key in first[case]["weights"])


@needs_gloo
@pytest.mark.parametrize("case", list(worker.CASES))
def test_two_processes_give_the_one_process_plan_and_weights(runs, case):
    _root, reference, (first, _second) = runs
    assert first[case]["report"]["processes"] == 2 and "processes" not in reference[case]["report"]
    # the plan: every layer's target, exactly
    assert first[case]["targets"] == reference[case]["targets"]
    # Fisher traces are float64 sums over sequences; summed per process then across, only the order differs
    for name, trace in reference[case]["sensitivity"].items():
        assert first[case]["sensitivity"][name] == pytest.approx(trace, rel=1e-9)
    # weights: the same zeros exactly, and values within summation tolerance. Wanda's input norms are float64
    # sums, so its weights come out identical. SparseGPT's Hessians are fp32 sums (relative rounding ~1e-7,
    # different per order), and its update solves with the damped inverse Hessian, whose condition number reaches
    # ~3e3 on this model: a bound of ~1e-3 relative; measured 1.9e-5 of the layer's largest weight. 2e-4 leaves a
    # 10x margin and is far below a wrong statistic (half the windows, or a flipped mask: a whole weight).
    for key, expected in reference[case]["weights"].items():
        got = first[case]["weights"][key]
        assert torch.equal(got == 0, expected == 0), key
        assert (got - expected).abs().max() <= 2e-4 * expected.abs().max(), key


@needs_gloo
@pytest.mark.parametrize("case", list(worker.CASES))
def test_the_search_splits_its_candidates_over_the_processes(runs, case):
    """Each process scores a share of every generation's new plans (and gathers the others' values): together they
    score what one process scores alone, each fewer."""
    _root, reference, ranks = runs
    here = [r[case]["report"]["allocation"]["evaluations_here"] for r in ranks]
    alone = reference[case]["report"]["allocation"]["evaluations_here"]
    assert sum(here) == alone and all(0 < count < alone for count in here)


@needs_gloo
def test_the_others_read_what_the_main_process_wrote_first(runs):
    _root, _reference, ranks = runs
    assert [result["first"] for result in ranks] == ["written by the main process"] * 2


@needs_gloo
def test_the_main_process_logs_the_processes_and_their_shares(runs):
    _root, _reference, (first, second) = runs
    line = ("Data-parallel run on 2 processes (gloo): calibration windows per process [3, 2]; "
            "Fisher windows per process [2, 1]")
    assert first["log"].count(line) == len(worker.CASES)
    assert not any(message.startswith("Data-parallel") for message in second["log"])


@needs_gloo
def test_the_blockwise_fisher_pass_splits_and_sums_too(runs):
    _root, reference, ranks = runs
    for result in ranks:
        assert result["blockwise_fisher"].keys() == reference["blockwise_fisher"].keys()
        for name, trace in reference["blockwise_fisher"].items():
            assert result["blockwise_fisher"][name] == pytest.approx(trace, rel=1e-9)


@needs_gloo
def test_every_calibration_window_is_computed_by_exactly_one_process(runs):
    """Each process ran its own share of the calibration windows through every statistics pass and the block-wise
    Fisher pass: per window, the passes over both processes add up to the one-process run's, all on one process."""
    _root, reference, ranks = runs
    calibration = {bytes(row.numpy()) for row in worker.calibration_windows()}

    def counts(result):
        return Counter(bytes(row.numpy()) for ids in result["captured"] for row in ids
                       if bytes(row.numpy()) in calibration)

    one, (first, second) = counts(reference), [counts(rank) for rank in ranks]
    assert set(one) == calibration
    for window, passes in one.items():
        assert sorted([first[window], second[window]]) == [0, passes]
    assert sum(1 for w in calibration if first[w]) == 3 and sum(1 for w in calibration if second[w]) == 2  # 3 + 2


@needs_gloo
def test_the_output_is_written_once_by_the_main_process(runs):
    root, _reference, _ranks = runs
    out = root / "two"
    writes = [(out / f"writes-rank{r}.txt").read_text().split() for r in range(2)]
    assert writes[1] == []  # rank 1 moved nothing into place: no checkpoint, cache entry or search checkpoint
    saved = [Path(path) for path in writes[0]]
    for case in worker.CASES:
        assert saved.count(out / case) == 1  # one folder per case, moved into place once
        assert out / f"{case}-search.json" in saved  # the search checkpoint (once per generation)
        assert (out / case / "config.json").is_file() and (out / case / "report.json").is_file()
    assert any(path.parent.name == "fisher" for path in saved) and any(path.parent.name == "statistics"
                                                                        for path in saved)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@needs_gloo
def test_a_search_checkpoint_of_two_processes_resumes_in_one(runs, tmp_path):
    """The search checkpoint's key holds no process count: one written by 2 processes is resumed by 1 (no search
    left to run) and gives the same plan."""
    root, _reference, (first, _second) = runs
    case = "wanda-msp"
    checkpoint = tmp_path / "search.json"
    checkpoint.write_text((root / "two" / f"{case}-search.json").read_text())
    result = worker.run_case(case, tmp_path, search_checkpoint=str(checkpoint))
    assert result["report"]["allocation"]["evaluations_this_run"] == 0
    assert result["targets"] == first[case]["targets"]


# ------------------------------------------------------------------------------------------- the split final prune


@needs_gloo
@pytest.mark.parametrize("mode", worker.SPLIT_MODES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_each_process_prunes_its_share_of_every_block(runs, method, mode):
    """The final prune's layers are split between the processes: each pruned some, none pruned a layer twice, and
    together they pruned exactly what one process prunes alone (the same layers to the same targets)."""
    _root, reference, ranks = runs
    alone = Counter(reference["split"][method, mode]["pruned"])
    here = [Counter(result["split"][method, mode]["pruned"]) for result in ranks]
    assert all(sum(counts.values()) > 0 for counts in here)
    assert here[0] + here[1] == alone
    blocks = {name.split(".")[2] for name, _target in alone}
    for block in blocks:  # within every block, not only overall
        assert all(any(name.split(".")[2] == block for name, _t in counts) for counts in here), block


@needs_gloo
@pytest.mark.parametrize("mode", worker.SPLIT_MODES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_the_split_prune_gives_every_process_the_one_process_weights(runs, method, mode):
    """Every pruned weight reaches every process: both hold the one-process weights (Wanda: identical; SparseGPT:
    within the tolerance of the summed Hessians, see above) and the same achieved sparsity of every layer. A
    statistics pass (``restore``) leaves the model dense on every process, and the statistics of the blocks after the
    first (fed by the pruned blocks, so by weights another process pruned) are the one-process ones."""
    _root, reference, ranks = runs
    expected = reference["split"][method, mode]
    first, second = (result["split"][method, mode] for result in ranks)
    assert first["achieved"] == second["achieved"] and first["achieved"].keys() == expected["achieved"].keys()
    for name, value in expected["achieved"].items():
        assert first["achieved"][name] == pytest.approx(value, abs=1e-12 if method == "wanda" else 2e-3), name
    for name, weight in expected["weights"].items():
        assert torch.equal(first["weights"][name], second["weights"][name]), name
        if method == "wanda":
            assert torch.equal(first["weights"][name], weight), name
        else:
            assert torch.equal(first["weights"][name] == 0, weight == 0), name
            assert (first["weights"][name] - weight).abs().max() <= 2e-4 * weight.abs().max(), name
    for name, states in expected["statistics"].items():
        for got, want in zip(first["statistics"][name], states):
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), name
    if mode == "offloaded":
        from optimum_msp.modeling.offload import is_offloaded

        assert all(is_offloaded(module) for block in worker._split_setup(offloaded=True)[1] for module in block.values())
    if mode == "restore":
        dense = worker._split_setup()[1]
        for block in dense:
            for name, module in block.items():
                assert torch.equal(first["weights"][name], module.weight), name


@needs_gloo
def test_a_failed_layer_fails_every_process_instead_of_leaving_them_waiting(runs):
    _root, reference, ranks = runs
    assert reference["failing"] == f"ValueError: {worker.FAILING} cannot be pruned"
    errors = sorted(result["failing"] for result in ranks)
    assert errors[0].startswith("RuntimeError: Another process failed to prune its share of the layers")
    assert worker.FAILING in errors[0]  # the block's layers are named
    assert errors[1] == reference["failing"]

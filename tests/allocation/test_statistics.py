import logging

import pytest
import torch

from optimum_msp import MSPConfig, MSPPruner
from optimum_msp.allocation import statistics
from optimum_msp.allocation.base import AllocationContext
from optimum_msp.data import CalibrationData
from optimum_msp.pruners import get_pruner
from optimum_msp.modeling.blocks import select_linears
from optimum_msp.modeling.sequential import BlockRunner
from optimum_msp.pruners.sparsegpt import InputHessian
from optimum_msp.pruners.wanda import InputNorms
from tiny_models import calibration_ids, tiny_model


def _context(arch="llama", seed=0):
    model = tiny_model(arch)
    runner = BlockRunner(model)
    layers = [select_linears(block, f"{runner.block_prefix}.{i}") for i, block in enumerate(runner.blocks)]
    config = MSPConfig(method="sparsegpt").resolved()
    return AllocationContext(model, layers, config.budget(), config.allocation_options(), get_pruner("sparsegpt"),
                             CalibrationData(calibration_ids(3, 16, seed=seed)), runner)


def _state(stats):
    return {name: (stat.tokens, [getattr(stat, field).clone() for field in stat.STATE]) for name, stat in stats.items()}


def _cache_files(tmp_path):
    """The statistics cache's entries: one folder each (an index and one file per block)."""
    folder = tmp_path / "cache" / "statistics"
    return sorted(path.parent for path in folder.glob("*/index.json")) if folder.is_dir() else []


@pytest.mark.parametrize("make_stats", [InputNorms, InputHessian])
def test_cached_statistics_equal_computed_ones_and_keep_sharing(make_stats, tmp_path, monkeypatch):
    context = _context()
    computed = statistics.dense_layer_statistics(context, make_stats)
    assert len(_cache_files(tmp_path)) == 1

    def no_forward(*args, **kwargs):
        raise AssertionError("a cache hit must not run the model")

    monkeypatch.setattr(statistics, "dense_statistics", no_forward)
    cached = statistics.dense_layer_statistics(context, make_stats)
    assert cached.keys() == computed.keys()
    for name, (tokens, tensors) in _state(computed).items():
        assert cached[name].tokens == tokens == 3 * 16
        for value, expected in zip(_state(cached)[name][1], tensors):
            assert torch.equal(value, expected)
    # q/k/v read the same input: one accumulator, in memory and after a cache round trip
    q, k, v = (f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert computed[q] is computed[k] is computed[v]
    assert cached[q] is cached[k] is cached[v]
    assert cached[q] is not cached["model.layers.0.mlp.down_proj"]


def test_cache_is_keyed_by_data_and_kind(tmp_path):
    statistics.dense_layer_statistics(_context(), InputNorms)
    statistics.dense_layer_statistics(_context(), InputHessian)
    statistics.dense_layer_statistics(_context(seed=1), InputNorms)
    statistics.dense_layer_statistics(_context(), InputNorms)  # a hit: no new entry
    assert len(_cache_files(tmp_path)) == 3


def test_damaged_entry_is_recomputed_with_a_warning(tmp_path, caplog):
    expected = _state(statistics.dense_layer_statistics(_context(), InputNorms))
    (entry,) = _cache_files(tmp_path)
    block_file = sorted(entry.glob("block-*.safetensors"))[1]
    block_file.write_bytes(block_file.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="optimum_msp.allocation.statistics"):
        again = statistics.dense_layer_statistics(_context(), InputNorms)
    assert "unreadable statistics cache" in caplog.text
    for name, (tokens, tensors) in expected.items():
        assert again[name].tokens == tokens and torch.equal(again[name].sum_squares, tensors[0])
    (rewritten,) = _cache_files(tmp_path)
    statistics.StatisticsStore(rewritten, InputNorms).validate(again)  # rewritten whole


@pytest.mark.parametrize("allocation", ["owl", "msp"])
def test_warm_cache_gives_the_same_plan(allocation):
    def plan():
        pruner = MSPPruner(tiny_model("llama"))
        pruner.prune(MSPConfig(method="wanda", sparsity=0.7, allocation=allocation, population_size=4,
                               generations=1, fisher_samples=2),
                     calibration=calibration_ids(4, 32), fitness_ids=calibration_ids(2, 32, seed=7))
        return {name: layer.target for name, layer in pruner.plan.layers.items()}, pruner.model.state_dict()

    (cold_plan, cold_weights), (warm_plan, warm_weights) = plan(), plan()
    assert cold_plan == warm_plan
    assert all(torch.equal(cold_weights[key], warm_weights[key]) for key in cold_weights)


def test_seeded_statistics_are_those_of_a_sequential_prune_with_the_seed_targets():
    from optimum_msp.allocation.base import uniform_target
    from optimum_msp.apply import apply_targets

    context = _context()
    pruner = context.pruner
    targets = {name: uniform_target(MSPConfig(sparsity=0.6).budget()) for block in context.layers for name in block}
    dense = statistics.dense_layer_statistics(context, pruner.new_statistics, use_cache=False)
    weights = {k: v.clone() for k, v in context.model.state_dict().items()}
    seeded = statistics.seeded_layer_statistics(context, targets)
    reference = _context()  # the same tiny model, pruned the standard way, statistics recorded on the way
    recorded = {}
    apply_targets(reference.runner, reference.layers, targets, pruner, reference.calibration.ids,
                  on_statistics=recorded.update)
    assert seeded.keys() == dense.keys() == recorded.keys()
    for name in seeded:
        torch.testing.assert_close(seeded[name].xtx, recorded[name].xtx)
        first_block = name.startswith("model.layers.0.")  # its inputs do not depend on any pruning
        assert torch.allclose(seeded[name].xtx, dense[name].xtx) == first_block, name
    # computing them pruned the model on the way, and restored it; a cache hit leaves it untouched
    assert all(torch.equal(weights[k], v) for k, v in context.model.state_dict().items())
    fresh = _context()
    again = statistics.seeded_layer_statistics(fresh, targets)
    assert all(torch.equal(weights[k], v) for k, v in fresh.model.state_dict().items())
    assert all(torch.equal(again[name].xtx, seeded[name].xtx) for name in seeded)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_search_on_seeded_statistics_hits_the_target_and_records_it(method):
    pruner = MSPPruner(tiny_model("llama"))
    pruner.prune(MSPConfig(method=method, sparsity=0.7, allocation="msp", search_statistics="seed",
                           population_size=4, generations=1, fisher_samples=2),
                 calibration=calibration_ids(4, 32), fitness_ids=calibration_ids(2, 32, seed=7))
    assert pruner.plan.planned_sparsity == pytest.approx(0.7, abs=1e-12)
    assert pruner.plan.verify(pruner.model).global_sparsity == pytest.approx(0.7, abs=0.01)
    assert pruner.plan.search["statistics"] == "seed"


def test_unknown_search_statistics_is_refused():
    with pytest.raises(ValueError, match=r"search_statistics must be one of \['auto', 'dense', 'seed'\]"):
        MSPConfig(search_statistics="sequential")


def test_auto_search_statistics_are_seeded_for_weight_updating_pruners_only():
    from optimum_msp.allocation.msp import search_statistics
    from optimum_msp.pruners import get_pruner

    assert MSPConfig().search_statistics == "auto"
    assert search_statistics("auto", get_pruner("sparsegpt")) == "seed"
    assert search_statistics("auto", get_pruner("wanda")) == "dense"
    assert search_statistics("auto", get_pruner("magnitude")) == "dense"
    assert search_statistics("dense", get_pruner("sparsegpt")) == "dense"

"""``apply_targets``: the sequential prune, and ``feed=`` (the inputs each block is pruned with)."""

import pytest
import torch

from optimum_msp import checks
from optimum_msp.apply import apply_targets, dense_statistics
from optimum_msp.modeling.blocks import select_linears
from optimum_msp.modeling.offload import read_matrix
from optimum_msp.modeling.sequential import BlockRunner
from optimum_msp.modeling.weights import WeightSnapshot
from optimum_msp.plan import LayerTarget
from optimum_msp.pruners import get_pruner
from tiny_models import calibration_ids, tiny_model


def _setup():
    model = tiny_model("llama")
    runner = BlockRunner(model)
    layers = [select_linears(block, f"{runner.block_prefix}.{i}") for i, block in enumerate(runner.blocks)]
    names = [name for block in layers for name in block]
    targets = {name: LayerTarget(sparsity=0.5 + 0.1 * (i % 3)) for i, name in enumerate(names)}
    feed = {name: LayerTarget(sparsity=0.8) for name in names}
    return model, runner, layers, targets, feed


def _weights(layers):
    return {name: read_matrix(module).clone() for block in layers for name, module in block.items()}


def _pruned_with(layers, pruner, stats_per_block, targets):
    """Every layer's weight pruned to its target with the given statistics, the model left as it is."""
    expected = {}
    for index, block in enumerate(layers):
        for name, module in block.items():
            weight = read_matrix(module).float()
            expected[name] = checks.checked_prune(name, weight, pruner, stats_per_block[index][name],
                                                  targets[name]).to(module.weight.dtype)
    return expected


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_dense_feed_prunes_every_layer_with_the_dense_models_statistics(method):
    model, runner, layers, targets, _ = _setup()
    pruner, ids = get_pruner(method), calibration_ids(3, 16)
    dense = dict(dense_statistics(runner, layers, ids, pruner.new_statistics))
    expected = _pruned_with(layers, pruner, dense, targets)

    achieved = apply_targets(runner, layers, targets, pruner, ids, feed={})
    got = _weights(layers)
    assert achieved.keys() == targets.keys()
    for name in targets:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_feed_plan_gives_the_statistics_a_sequential_prune_with_it_sees(method):
    model, runner, layers, targets, feed = _setup()
    pruner, ids = get_pruner(method), calibration_ids(3, 16)
    seen = []
    apply_targets(runner, layers, feed, pruner, ids, restore=True, on_statistics=seen.append)  # model unchanged
    expected = _pruned_with(layers, pruner, seen, targets)

    achieved = apply_targets(runner, layers, targets, pruner, ids, feed=feed)
    got = _weights(layers)
    for name in targets:
        assert torch.equal(got[name], expected[name]), name
        # every layer ends at its own target, none at the feed's
        assert achieved[name] == pytest.approx(targets[name].sparsity, abs=0.02), name


def test_feeding_the_targets_themselves_is_the_sequential_prune():
    _, runner, layers, targets, _ = _setup()
    pruner, ids = get_pruner("sparsegpt"), calibration_ids(3, 16)
    with WeightSnapshot({n: m for block in layers for n, m in block.items()}):
        apply_targets(runner, layers, targets, pruner, ids)
        sequential = _weights(layers)
    apply_targets(runner, layers, targets, pruner, ids, feed=targets)
    fed = _weights(layers)
    assert all(torch.equal(fed[name], sequential[name]) for name in targets)


def test_restore_and_feed_together_are_refused():
    _, runner, layers, targets, feed = _setup()
    with pytest.raises(ValueError, match="feed="):
        apply_targets(runner, layers, targets, get_pruner("wanda"), calibration_ids(2, 8), restore=True, feed=feed)


@pytest.mark.parametrize("processes, costs, owners", [
    (1, [5.0, 1.0, 1.0], [0, 0, 0]),
    (2, [5.0, 1.0, 1.0, 1.0, 1.0, 1.0], [0, 1, 1, 1, 1, 1]),  # the big one alone: 5 against 5
    (2, [1.0, 3.0, 2.0, 2.0], [0, 0, 1, 1]),                  # 3 + 1 against 2 + 2
    (3, [2.0, 2.0, 2.0, 2.0], [0, 1, 2, 0]),
])
def test_the_work_is_assigned_largest_first_to_the_least_loaded_process(processes, costs, owners):
    from optimum_msp import distributed

    assert distributed.assign(costs, processes) == owners


@pytest.mark.parametrize("method, units", [
    # SparseGPT factors each distinct input once: the layers that share one stay together
    ("sparsegpt", [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
    ("wanda", [["q_proj"], ["k_proj"], ["v_proj"], ["o_proj"], ["gate_proj"], ["up_proj"], ["down_proj"]]),
])
def test_a_blocks_layers_are_split_in_units_of_work(method, units):
    from optimum_msp.apply import _work
    from optimum_msp.modeling.sequential import forward_with_statistics

    _, runner, layers, targets, _ = _setup()
    pruner = get_pruner(method)
    inputs = runner.capture(calibration_ids(2, 16))
    stats = forward_with_statistics(runner, 0, inputs, layers[0], pruner.new_statistics)
    jobs = {name: (module, stats[name], targets[name]) for name, module in layers[0].items()}
    found, costs = _work(jobs, pruner)
    assert sorted(sorted(name.rsplit(".", 1)[1] for name in unit) for unit in found) == sorted(map(sorted, units))
    # SparseGPT: in³ to factor the unit's Hessian, out·in² per layer (down_proj, in = 128, costs the most); Wanda:
    # the weight's size
    costs = {tuple(name.rsplit(".", 1)[1] for name in unit): cost for unit, cost in zip(found, costs)}
    if method == "sparsegpt":
        assert costs[("down_proj",)] == 128 ** 3 + 64 * 128 ** 2 == max(costs.values())
        assert costs[("q_proj", "k_proj", "v_proj")] == 64 ** 3 + (64 + 32 + 32) * 64 ** 2
    else:
        assert costs[("down_proj",)] == 64 * 128 and costs[("k_proj",)] == 32 * 64

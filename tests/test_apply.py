"""``apply``: the sequential prune, pruning with given statistics, and how a block's layers are split."""

import pytest
import torch

from optimum_msp import checks
from optimum_msp.apply import dense_statistics, prune_with_statistics
from optimum_msp.modeling.blocks import select_linears
from optimum_msp.modeling.offload import read_matrix
from optimum_msp.modeling.sequential import BlockRunner
from optimum_msp.plan import LayerTarget
from optimum_msp.pruners import get_pruner
from tiny_models import calibration_ids, tiny_model


def _setup():
    model = tiny_model("llama")
    runner = BlockRunner(model)
    layers = [select_linears(block, f"{runner.block_prefix}.{i}") for i, block in enumerate(runner.blocks)]
    names = [name for block in layers for name in block]
    targets = {name: LayerTarget(sparsity=0.5 + 0.1 * (i % 3)) for i, name in enumerate(names)}
    return model, runner, layers, targets


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
def test_pruning_with_given_statistics_runs_no_forward_and_prunes_each_layer_with_its_own(method, monkeypatch):
    model, runner, layers, targets = _setup()
    pruner, ids = get_pruner(method), calibration_ids(3, 16)
    dense = dict(dense_statistics(runner, layers, ids, pruner.new_statistics))
    expected = _pruned_with(layers, pruner, dense, targets)

    def no_forward(*args, **kwargs):
        raise AssertionError("pruning with given statistics must not run the model")

    monkeypatch.setattr(runner, "capture", no_forward)
    monkeypatch.setattr(runner, "walk", no_forward)
    given = {name: stat for block in dense.values() for name, stat in block.items()}
    achieved = prune_with_statistics(runner, layers, targets, pruner, given)
    got = _weights(layers)
    assert achieved.keys() == targets.keys()
    for name in targets:
        assert torch.equal(got[name], expected[name]), name
        assert achieved[name] == pytest.approx(targets[name].sparsity, abs=0.02), name


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

    _, runner, layers, targets = _setup()
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


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_dense_statistics_run_each_block_once_and_gather_what_a_statistics_pass_gathers(method):
    from optimum_msp.modeling.sequential import forward_with_statistics

    _, runner, layers, _targets = _setup()
    pruner, ids = get_pruner(method), calibration_ids(3, 16)
    # reference: a statistics pass through each dense block, then its outputs as the next block's inputs
    inputs = runner.capture(ids)
    reference = {}
    for index in range(len(runner.blocks)):
        reference[index] = forward_with_statistics(runner, index, inputs, layers[index], pruner.new_statistics)
        runner.advance(index, inputs)
    calls = []
    handles = [block.register_forward_pre_hook(lambda module, args, index=index: calls.append(index))
               for index, block in enumerate(runner.blocks)]
    try:
        dense = dict(dense_statistics(runner, layers, ids, pruner.new_statistics))
    finally:
        for handle in handles:
            handle.remove()
    # one pass of the 3 windows (batch size 1) per block: the statistics ride on the pass that feeds the next block
    assert sorted(calls) == sorted(list(range(len(runner.blocks))) * 3)
    assert dense.keys() == reference.keys()
    for index, block in reference.items():
        assert dense[index].keys() == block.keys()
        for name, stat in block.items():
            for state in stat.STATE + ("tokens",):
                assert torch.equal(torch.as_tensor(getattr(dense[index][name], state)),
                                   torch.as_tensor(getattr(stat, state))), (name, state)

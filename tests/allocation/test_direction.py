"""Every allocator gives the most weights to the block that matters most.

Each test builds a 4-block tiny LLaMA in which one block (``SENSITIVE``) is made clearly the most sensitive
in the sense its allocator measures, and asserts that this block keeps the most weights. Inverting an
allocator's direction (more sensitive -> sparser) makes its test fail: see the issue notes for the mutation
runs that showed it.
"""

import pytest
import torch
from optimum_msp import MSPConfig, MSPPruner
from tiny_models import calibration_ids, tiny_model

SENSITIVE = 2
BLOCKS = 4


def _model(change) -> torch.nn.Module:
    model = tiny_model("llama", num_hidden_layers=BLOCKS)
    with torch.no_grad():
        change(model.model.layers)
    return model


def _block_levels(model, config, **prune_kwargs):
    pruner = MSPPruner(model)
    pruner.prune(config, calibration=calibration_ids(6, 32), fitness_ids=calibration_ids(2, 32, seed=7),
                 **prune_kwargs)
    plan = pruner.plan
    # every targeted linear of a block shares its level (granularity="block"): read one per block
    levels = [plan.layers[f"model.layers.{i}.mlp.down_proj"].target.sparsity for i in range(BLOCKS)]
    return levels, plan


def _densest(levels):
    lowest = min(levels)
    return [i for i, level in enumerate(levels) if level == lowest]


def larger_inputs(blocks):
    """The block's linears see 6x larger inputs (its norms scaled): 36x their squared gradients."""
    blocks[SENSITIVE].input_layernorm.weight.mul_(6.0)
    blocks[SENSITIVE].post_attention_layernorm.weight.mul_(6.0)


def outlier_columns(blocks):
    """A few input columns of each of the block's linears carry 30x larger weights: OWL's outliers."""
    generator = torch.Generator().manual_seed(1)
    for module in blocks[SENSITIVE].modules():
        if isinstance(module, torch.nn.Linear):
            columns = torch.randperm(module.weight.shape[1], generator=generator)[:4]
            module.weight[:, columns] *= 30.0


def carries_the_model(blocks):
    """The block's output projections are 3x larger and every other block's 10x smaller: the model's output is
    mostly this block's, so pruning it moves the output most."""
    for index, block in enumerate(blocks):
        factor = 3.0 if index == SENSITIVE else 0.1
        block.mlp.down_proj.weight.mul_(factor)
        block.self_attn.o_proj.weight.mul_(factor)


def test_fisher_keeps_the_most_weights_in_the_block_with_the_largest_trace():
    levels, plan = _block_levels(_model(larger_inputs), MSPConfig(method="wanda", sparsity=0.6, allocation="fisher"))
    traces = [plan.block_sensitivity[str(i)] for i in range(BLOCKS)]
    assert max(range(BLOCKS), key=traces.__getitem__) == SENSITIVE, traces
    assert _densest(levels) == [SENSITIVE], levels


def test_owl_keeps_the_most_weights_in_the_block_with_the_most_outliers():
    levels, _ = _block_levels(_model(outlier_columns), MSPConfig(method="wanda", sparsity=0.6, allocation="owl"))
    assert _densest(levels) == [SENSITIVE], levels


@pytest.mark.parametrize("seed_plan, selection", [("fisher", {}), ("uniform", {}),
                                                   ("uniform", dict(offspring=16, selection_steps="1:6"))])
def test_msp_search_keeps_the_most_weights_in_the_block_the_output_depends_on(seed_plan, selection, monkeypatch):
    """With the Fisher seed, and with a uniform seed, so that the search alone has to find the direction (also
    with multi-step selection: children screened on one fitness window)."""
    import optimum_msp.allocation.msp as msp

    if seed_plan == "uniform":
        monkeypatch.setattr(msp, "fisher_genome", lambda space, *args, **kwargs: space.uniform())
    config = MSPConfig(method="wanda", sparsity=0.6, allocation="msp", fitness="kl", population_size=8,
                       generations=3, fisher_samples=4, **selection)
    levels, plan = _block_levels(_model(carries_the_model), config)
    assert _densest(levels) == [SENSITIVE], levels
    assert plan.search["best_fitness"] < plan.search["uniform_fitness"]

import copy
import math

import pytest
import torch

from optimum_msp import MSPConfig, MSPPruner, PlanError, SparsityPlan
from optimum_msp.plan import LayerTarget
from tiny_models import calibration_ids, tiny_model


@pytest.fixture(scope="module")
def pruned():
    model = tiny_model("llama")
    MSPPruner(model).prune(MSPConfig(method="wanda", pattern="2:4"), calibration=calibration_ids())
    return model


def test_round_trip(pruned):
    plan = SparsityPlan.from_config(pruned.config)
    assert SparsityPlan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()
    assert plan.planned_sparsity == pytest.approx(0.5)


def _tampered(pruned, edit):
    data = copy.deepcopy(pruned.config.sparsity_plan)
    edit(data)
    return data


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(extra=1), "unknown keys"),
        (lambda d: d.update(format_version=99), "format_version"),
        (lambda d: d.update(pattern="blocks"), "pattern"),
        (lambda d: d.update(layers={}), "non-empty"),
        (lambda d: d["layers"]["model.layers.0.mlp.up_proj"].update(sparsity=1.5), "model.layers.0.mlp.up_proj"),
        (lambda d: d["layers"]["model.layers.0.mlp.up_proj"].update(n=5), "0 <= N <= M"),
        (lambda d: d["layers"]["model.layers.0.mlp.up_proj"].update(numel="many"), "positive integer"),
        (lambda d: d["layers"]["model.layers.0.mlp.up_proj"].update(bogus=True), "unknown keys"),
        (lambda d: d["layers"]["model.layers.0.mlp.up_proj"].update(sparsity=0.25), "contradicts"),
        (lambda d: d.update(target_sparsity="half"), "finite number"),
    ],
)
def test_malformed_plans_are_rejected_naming_the_problem(pruned, edit, message):
    with pytest.raises(PlanError, match=message):
        SparsityPlan.from_dict(_tampered(pruned, edit))


def test_plan_naming_a_missing_layer(pruned):
    copied = "model.layers.0.mlp.up_proj"
    data = _tampered(pruned, lambda d: d["layers"].update({"model.layers.9.mlp.up_proj": d["layers"][copied]}))
    with pytest.raises(PlanError, match="model.layers.9.mlp.up_proj"):
        SparsityPlan.from_dict(data).verify(pruned)


def test_weights_breaking_the_plan_are_caught(pruned):
    plan = SparsityPlan.from_config(pruned.config)
    weight = pruned.model.layers[1].mlp.down_proj.weight
    zero = (weight[0, :4] == 0).nonzero()[0, 0]
    original = weight.data[0, zero].item()
    weight.data[0, zero] = 1.0
    try:
        with pytest.raises(PlanError, match=r"model.layers.1.mlp.down_proj.*2:4"):
            plan.verify(pruned)
    finally:
        weight.data[0, zero] = original
    plan.verify(pruned)


def test_unstructured_floor_is_checked():
    model = tiny_model("llama")
    MSPPruner(model).prune(MSPConfig(method="magnitude", sparsity=0.5))
    plan = SparsityPlan.from_config(model.config)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.fill_(1.0)
    with pytest.raises(PlanError, match="model.layers.0.self_attn.q_proj.*requires 0.5"):
        plan.verify(model)


def test_layer_target_validation():
    assert LayerTarget.nm(3, 8).sparsity == pytest.approx(0.625)
    with pytest.raises(PlanError):
        LayerTarget(sparsity=1.2)
    with pytest.raises(PlanError):
        LayerTarget(sparsity=0.5, n=2)


def test_a_violation_reads_as_counts_not_rounded_fractions():
    from optimum_msp.plan import LayerPlan

    model = tiny_model("llama")
    name = "model.layers.0.mlp.down_proj"  # [64, 128]: 8,192 weights
    module = dict(model.named_modules())[name]
    with torch.no_grad():
        module.weight.fill_(1.0)
        module.weight.view(-1)[:4095] = 0.0  # one zero short of 50 %: prints as 0.5000 either way
    plan = SparsityPlan("magnitude", "unstructured", "uniform", 0.5, {name: LayerPlan(LayerTarget(0.5), 8192)})
    expected = r"has 4,095 zero weights of 8,192, but its plan requires 0.5 sparsity \(at least 4,096 zeros\)"
    with pytest.raises(PlanError, match=expected):
        plan.verify(model, per_row=True)  # magnitude rounds per row: at least 64 x 64 zeros

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


# ------------------------------------------------------------------------ held to the targets, not to `achieved`
def _pruned_unstructured(method="wanda", sparsity=0.5):
    model = tiny_model("llama")
    MSPPruner(model).prune(MSPConfig(method=method, sparsity=sparsity), calibration=calibration_ids())
    return model


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_dense_weights_with_achieved_edited_to_zero_are_caught(method):
    model = _pruned_unstructured(method)
    data = copy.deepcopy(model.config.sparsity_plan)
    for layer in data["layers"].values():
        layer["achieved"] = 0.0  # what a forger edits; the target sparsity is kept
    dense = tiny_model("llama")
    layer = "model.layers.1.mlp.gate_proj"
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight.copy_(dense.model.layers[1].mlp.gate_proj.weight)
    with pytest.raises(PlanError, match=rf"{layer}.*requires 0\.5 sparsity"):
        SparsityPlan.from_dict(data).verify(model)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.3, 1 / 3, 0.537, 0.7])
def test_what_the_pruners_achieve_passes_the_tolerance_without_achieved(method, sparsity):
    model = _pruned_unstructured(method, sparsity)
    data = copy.deepcopy(model.config.sparsity_plan)
    for layer in data["layers"].values():
        layer.pop("achieved")
    SparsityPlan.from_dict(data).verify(model)


def test_required_zeros_allow_the_pruners_rounding_only():
    from optimum_msp.plan import required_zeros

    # per output row (Wanda, magnitude): floor(0.537 * 128) = 68 per row
    assert required_zeros(64, 128, LayerTarget(0.537), per_row=True) == 64 * 68
    # per column block (SparseGPT): half a weight per input column at most
    assert required_zeros(64, 128, LayerTarget(0.537), per_row=False) == min(64 * 68, math.ceil(0.537 * 64 * 128 - 64))
    assert required_zeros(64, 128, LayerTarget(0.5), per_row=False) == 64 * 64 - 64
    assert required_zeros(64, 128, LayerTarget.nm(2, 8), per_row=True) == 64 * 16 * 6
    # rounding noise of binary fractions does not cost a zero: 0.7 * 10 is 6.999... in floating point
    assert required_zeros(3, 10, LayerTarget(0.7), per_row=True) == 21


# ---------------------------------------------------------------------------------------- strict parsing
@pytest.mark.parametrize("edit, message", [
    (lambda d: d["layers"].update({"lm_head": d["layers"]["model.layers.0.mlp.up_proj"]}), r"'lm_head'.*decoder blocks"),
    (lambda d: d["layers"].update({"model.embed_tokens": d["layers"]["model.layers.0.mlp.up_proj"]}),
     "decoder blocks"),
    (lambda d: d["layers"]["model.layers.0.mlp.up_proj"].update(n=4, m=8), r"m=8 contradicts the plan's m=4"),
    (lambda d: d.update(m=8), "contradicts the plan's m=8"),
    (lambda d: d.update(pattern="unstructured"), "'unstructured'"),
    (lambda d: d.update(block_sensitivity={"0": "high"}), "block_sensitivity.*finite number"),
    (lambda d: d.update(block_sensitivity={"first": 1.0}), "block indices"),
    (lambda d: d["calibration"].update(deep=[[[[[[[[[[[1]]]]]]]]]]]), r"'calibration' is nested deeper than 8"),
    (lambda d: d.update(search={"history": list(range(200_000))}), r"'search' holds more than 100,000"),
])
def test_plans_that_optimum_msp_cannot_have_written_are_refused(pruned, edit, message):
    with pytest.raises(PlanError, match=message):
        SparsityPlan.from_dict(_tampered(pruned, edit))


def test_deeply_nested_entry_is_refused_without_recursion():
    data = SparsityPlan.from_config(tiny_pruned_config()).to_dict()
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    data["calibration"]["deep"] = deep
    with pytest.raises(PlanError, match="nested deeper"):
        SparsityPlan.from_dict(data)


def tiny_pruned_config():
    model = tiny_model("llama")
    MSPPruner(model).prune(MSPConfig(method="magnitude", pattern="2:4"))
    return model.config


def test_plan_naming_a_1d_weight_is_a_plan_error(pruned):
    from optimum_msp.plan import LayerPlan

    plan = SparsityPlan.from_config(pruned.config)
    plan.layers["model.layers.0.post_attention_layernorm"] = LayerPlan(LayerTarget.nm(2, 4), 64)
    with pytest.raises(PlanError, match=r"model\.layers\.0\.post_attention_layernorm.*1-D weight"):
        plan.verify(pruned)


def test_masks_refuse_1d_weights_clearly():
    from optimum_msp.masks import nm_mask, nm_violations, unstructured_mask

    for call in (lambda: nm_violations(torch.ones(8), 2, 4), lambda: nm_mask(torch.ones(8), 2, 4),
                 lambda: unstructured_mask(torch.ones(8), 0.5)):
        with pytest.raises(ValueError, match=r"\[out_features, in_features\] matrix, got a 1-D tensor"):
            call()

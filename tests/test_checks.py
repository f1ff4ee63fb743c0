"""Silent failures of a prune turned into errors: non-finite weights, activations, statistics and results.

Before these checks a NaN/inf weight in block 0 left the layers after it dense (Wanda, OWL) with a plan that
recorded achieved 0.0 and verified; a 1e38 weight made SparseGPT zero every linear of block 1.
"""

import pytest
import torch

from optimum_msp import MSPConfig, MSPPruner
from optimum_msp import pruner as pruner_module
from optimum_msp.plan import LayerTarget
from optimum_msp.pruners import get_pruner
from tiny_models import calibration_ids, tiny_model


def _checks():
    # imported per test: the end-to-end tests need only the public API (they also ran, and failed, before it existed)
    from optimum_msp import checks

    return checks

CORRUPTED = "model.layers.0.mlp.down_proj"


def _corrupted(value: float, where: str = "weight"):
    model = tiny_model("llama")
    with torch.no_grad():
        if where == "embeddings":
            model.model.embed_tokens.weight.fill_(value)
        else:
            model.model.layers[0].mlp.down_proj.weight[0, 0] = value
    return model


@pytest.mark.parametrize("method, allocation, value", [
    ("wanda", "uniform", float("nan")),
    ("wanda", "uniform", float("inf")),
    ("wanda", "owl", float("nan")),
    ("wanda", "owl", float("inf")),
    ("sparsegpt", "uniform", float("nan")),
])
def test_non_finite_weight_is_refused_naming_it_before_anything_is_pruned(method, allocation, value):
    model = _corrupted(value)
    before = {k: v.clone() for k, v in model.state_dict().items() if "layers.0.mlp.down_proj" not in k}
    with pytest.raises(ValueError, match=rf"{CORRUPTED}\.weight \(1 (NaN|inf)\)"):
        MSPPruner(model).prune(MSPConfig(method=method, sparsity=0.5, allocation=allocation),
                               calibration=calibration_ids())
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())  # nothing pruned
    assert getattr(model.config, "sparsity_plan", None) is None


def test_all_nan_embeddings_are_refused_naming_them():
    model = _corrupted(float("nan"), where="embeddings")
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight"):
        MSPPruner(model).prune(MSPConfig(method="wanda", sparsity=0.5), calibration=calibration_ids())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_overflowing_activation_is_an_error_naming_block_and_layer(method):
    """1e38 is a finite weight: block 0's output overflows, block 1's norm turns it into all-zero inputs."""
    model = _corrupted(1e38)
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.1\.self_attn\.q_proj' \(decoder block 1\).*all exactly "
                                         r"zero"):
        MSPPruner(model).prune(MSPConfig(method=method, sparsity=0.5), calibration=calibration_ids())


@pytest.mark.parametrize("method, allocation", [("wanda", "uniform"), ("wanda", "owl"), ("sparsegpt", "uniform")])
def test_non_finite_weight_is_caught_at_prune_time_too(method, allocation, monkeypatch):
    """Defence in depth: without the up-front model check, the statistics/weight checks still name the layer."""
    monkeypatch.setattr(pruner_module, "check_model", lambda model: None)
    model = _corrupted(float("nan"))
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.[01]\.[a-z_.]+' \(decoder block [01]\)"):
        MSPPruner(model).prune(MSPConfig(method=method, sparsity=0.5, allocation=allocation),
                               calibration=calibration_ids())


def test_non_finite_statistics_name_the_layer():
    checked_prune, NonFiniteError = _checks().checked_prune, _checks().NonFiniteError
    pruner = get_pruner("wanda")
    stats = pruner.new_statistics(8)
    stats.add_batch(torch.full((4, 8), float("inf")))
    with pytest.raises(NonFiniteError, match=r"layer 'model\.layers\.3\.mlp\.up_proj' \(decoder block 3\).*inf"):
        checked_prune("model.layers.3.mlp.up_proj", torch.ones(4, 8), pruner, stats, LayerTarget(0.5))


def test_non_finite_scores_are_refused_by_score_pruners():
    NonFiniteError = _checks().NonFiniteError
    pruner = get_pruner("magnitude")
    weight = torch.ones(4, 8)
    weight[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        pruner.mask(weight, None, LayerTarget(0.5))


def test_a_pruned_layer_that_stayed_dense_or_came_out_all_zero_is_an_error():
    check_pruned_layer, NonFiniteError = _checks().check_pruned_layer, _checks().NonFiniteError
    dense = torch.arange(1.0, 33.0).reshape(4, 8)
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.x' .*0 zero weights of 32 \(at least 16"):
        check_pruned_layer("model.layers.0.x", dense, dense, LayerTarget(0.5), per_row=True)
    with pytest.raises(ValueError, match="zeroed every weight"):
        check_pruned_layer("model.layers.0.x", dense, torch.zeros_like(dense), LayerTarget(0.5), per_row=False)
    with pytest.raises(NonFiniteError, match="NaN"):
        check_pruned_layer("model.layers.0.x", dense, torch.full_like(dense, float("nan")), LayerTarget(0.5))
    with pytest.raises(ValueError, match="2:4"):
        check_pruned_layer("model.layers.0.x", dense, dense, LayerTarget.nm(2, 4))
    check_pruned_layer("model.layers.0.x", dense, dense * (dense > 16), LayerTarget(0.5), per_row=False)


def test_plain_module_is_refused_before_any_weight_changes():
    """A model without a config cannot hold a plan: refuse it before touching the weights."""
    model = tiny_model("llama")
    plain = torch.nn.Module()
    plain.model = model.model  # the decoder blocks, but no .config
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match="no transformers config"):
        MSPPruner(plain).prune(MSPConfig(method="magnitude", sparsity=0.5))
    assert all(torch.equal(value, plain.state_dict()[key]) for key, value in before.items())


def test_check_model_accepts_a_healthy_model():
    check_model = _checks().check_model
    check_model(tiny_model("llama"))
    with pytest.raises(ValueError, match="no transformers config"):
        check_model(torch.nn.Linear(2, 2))

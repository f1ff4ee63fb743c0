"""The allocators' on-disk cache is keyed by the whole model (every parameter and buffer), not by its name or by
a few sums of the pruned layers: a model whose pruned layers match but whose embeddings or norms differ must not
be served another model's Fisher traces or statistics."""

import pytest
import torch

from optimum_msp.allocation import cache, statistics
from optimum_msp.allocation.fisher import fisher_traces
from optimum_msp.modeling.blocks import prunable_layers
from optimum_msp.pruners.wanda import InputNorms
from tiny_models import calibration_ids, tiny_model


def _layers(model):
    return {name: module for block in prunable_layers(model) for name, module in block.items()}


def _variant(edit):
    model = tiny_model("llama")
    with torch.no_grad():
        edit(model)
    return model


VARIANTS = {
    "embeddings": lambda m: m.model.embed_tokens.weight.mul_(2.0),
    "a norm": lambda m: m.model.layers[1].input_layernorm.weight.add_(0.5),
    "the final norm": lambda m: m.model.norm.weight.add_(0.5),
    "lm_head": lambda m: m.lm_head.weight.mul_(-1.0),
    # a permutation keeps the sum and the abs-sum the old key used
    "a permuted pruned layer": lambda m: m.model.layers[0].mlp.up_proj.weight.copy_(
        m.model.layers[0].mlp.up_proj.weight.flip(0)),
    "a buffer": lambda m: m.model.rotary_emb.inv_freq.mul_(0.5),
    "the config": lambda m: setattr(m.config, "rms_norm_eps", 1e-2),
}


@pytest.mark.parametrize("what", list(VARIANTS))
def test_models_differing_outside_the_pruned_layers_get_other_keys(what):
    reference, variant = tiny_model("llama"), _variant(VARIANTS[what])
    ids = calibration_ids()
    assert cache.fingerprint(reference, _layers(reference), ids) != cache.fingerprint(variant, _layers(variant), ids)


def test_identical_models_share_a_key_wherever_they_were_loaded_from():
    a, b = tiny_model("llama"), tiny_model("llama")
    a.config._name_or_path, b.config._name_or_path = "/somewhere", "/elsewhere"
    ids = calibration_ids()
    assert cache.fingerprint(a, _layers(a), ids) == cache.fingerprint(b, _layers(b), ids)
    assert cache.fingerprint(a, _layers(a), ids) != cache.fingerprint(a, _layers(a), ids, "other settings")
    assert cache.fingerprint(a, _layers(a), ids) != cache.fingerprint(a, _layers(a), ids.to(torch.int32))


def test_the_key_includes_the_library_version(monkeypatch):
    model, ids = tiny_model("llama"), calibration_ids()
    before = cache.fingerprint(model, _layers(model), ids)
    monkeypatch.setattr(cache, "__version__", "9.9.9")
    assert cache.fingerprint(model, _layers(model), ids) != before


def test_fisher_traces_are_not_served_to_a_model_with_other_embeddings():
    ids = calibration_ids(2, 16)
    reference = tiny_model("llama")
    cached = fisher_traces(reference, _layers(reference), ids)
    variant = _variant(VARIANTS["embeddings"])
    fresh = fisher_traces(variant, _layers(variant), ids)
    assert fresh == fisher_traces(variant, _layers(variant), ids, use_cache=False)
    assert fresh != cached


def test_dense_statistics_are_not_served_to_a_model_with_other_norms(tmp_path):
    from optimum_msp.allocation.base import AllocationContext
    from optimum_msp.data import CalibrationData
    from optimum_msp.modeling.sequential import BlockRunner
    from optimum_msp import MSPConfig

    def context(model):
        runner = BlockRunner(model)
        config = MSPConfig(method="wanda").resolved()
        return AllocationContext(model, prunable_layers(model), config.budget(), config.allocation_options(),
                                 None, CalibrationData(calibration_ids(3, 16)), runner)

    reference = statistics.dense_layer_statistics(context(tiny_model("llama")), InputNorms)
    variant = statistics.dense_layer_statistics(context(_variant(VARIANTS["a norm"])), InputNorms)
    name = "model.layers.1.self_attn.q_proj"  # reads the changed norm's output
    assert not torch.equal(reference[name].sum_squares, variant[name].sum_squares)
    assert len(list((tmp_path / "cache" / "statistics").glob("*/index.json"))) == 2


def test_weights_on_the_meta_device_cannot_be_hashed():
    """Offloaded weights are not in memory: the caches are then bypassed (see fisher_traces / _cached)."""
    with pytest.raises(cache.UnhashableModelError, match="meta"):
        cache.model_fingerprint(torch.nn.Linear(2, 2, device="meta"))
    assert len(cache.model_fingerprint(tiny_model("llama"))) == 64


def test_offloaded_weights_are_hashed_from_where_they_are_stored(tmp_path):
    """The same weights give the same key whether they sit on the module or in accelerate's offload storage."""
    import accelerate
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path)
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path)
    offloaded = accelerate.cpu_offload(AutoModelForCausalLM.from_pretrained(tmp_path), execution_device="cpu")
    assert any(p.device.type == "meta" for p in offloaded.parameters())
    assert cache.model_fingerprint(offloaded) == cache.model_fingerprint(in_memory)

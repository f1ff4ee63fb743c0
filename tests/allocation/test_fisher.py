import pytest
import torch

from optimum_msp.allocation.fisher import fisher_traces
from tiny_models import calibration_ids, tiny_model


def test_fisher_trace_equals_sum_of_squared_per_sequence_gradients():
    model = tiny_model("llama")
    layers = {"model.layers.1.mlp.down_proj": model.model.layers[1].mlp.down_proj,
              "model.layers.0.self_attn.q_proj": model.model.layers[0].self_attn.q_proj}
    ids = calibration_ids(3, 16)
    traces = fisher_traces(model, layers, ids, use_cache=False)
    for name, module in layers.items():
        by_hand = 0.0
        for row in range(3):
            model.zero_grad()
            loss = model(input_ids=ids[row : row + 1], labels=ids[row : row + 1]).loss
            (grad,) = torch.autograd.grad(loss, module.weight)
            by_hand += float((grad**2).sum())
        assert traces[name] == pytest.approx(by_hand, rel=1e-4)
    # the square of the batch gradient is a different (smaller) quantity: make sure we did not compute it
    loss = sum(model(input_ids=ids[r : r + 1], labels=ids[r : r + 1]).loss for r in range(3))
    (batch_grad,) = torch.autograd.grad(loss, layers["model.layers.1.mlp.down_proj"].weight)
    assert traces["model.layers.1.mlp.down_proj"] != pytest.approx(float((batch_grad**2).sum()), rel=1e-3)


def test_fisher_leaves_no_gradients_and_restores_flags():
    model = tiny_model("gpt2")
    model.transformer.wte.weight.requires_grad_(False)
    layers = {"transformer.h.0.mlp.c_fc": model.transformer.h[0].mlp.c_fc}
    fisher_traces(model, layers, calibration_ids(2, 8), use_cache=False)
    assert all(p.grad is None for p in model.parameters())
    assert not model.transformer.wte.weight.requires_grad
    assert model.transformer.h[0].mlp.c_proj.weight.requires_grad


def test_fisher_cache_is_reused_and_keyed_by_data(tmp_path):
    model = tiny_model("llama")
    layers = {"model.layers.0.mlp.up_proj": model.model.layers[0].mlp.up_proj}
    first = fisher_traces(model, layers, calibration_ids(2, 8))
    files = list((tmp_path / "cache" / "fisher").iterdir())
    assert len(files) == 1
    files[0].write_text('{"model.layers.0.mlp.up_proj": 123.0}')  # a cache hit returns the stored value
    assert fisher_traces(model, layers, calibration_ids(2, 8)) == {"model.layers.0.mlp.up_proj": 123.0}
    other = fisher_traces(model, layers, calibration_ids(2, 8, seed=1))
    assert other != first and len(list((tmp_path / "cache" / "fisher").iterdir())) == 2

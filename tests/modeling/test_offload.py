"""Models that do not sit in memory on one device: offloaded to disk or to host memory, computed elsewhere.

The pruned weights and the plan must be those of the same model held in memory, bit for bit, for every pruner
and allocation; a layer whose pruned weights cannot be written is an error, never a dense layer."""

import json

import accelerate
import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_msp import MSPConfig, MSPPruner, PlanError, SparsityPlan
from optimum_msp.allocation.fisher import fisher_traces
from optimum_msp.modeling.blocks import prunable_layers
from optimum_msp.modeling.offload import is_offloaded, read_matrix, write_matrix
from optimum_msp.modeling.sequential import BlockRunner
from tiny_models import ARCHITECTURES, MIXED_ARCHITECTURES, calibration_ids, tiny_model

DISK_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
            "model.norm": "cpu", "lm_head": "cpu", "model.rotary_emb": "cpu"}
RUNS = [(method, allocation) for method in ("magnitude", "wanda", "sparsegpt")
        for allocation in ("uniform", "owl", "fisher", "msp")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    return path


def _load(folder, where, tmp_path):
    if where == "memory":
        return AutoModelForCausalLM.from_pretrained(folder)
    if where == "disk":
        return AutoModelForCausalLM.from_pretrained(folder, device_map=DISK_MAP, offload_folder=tmp_path / "offload")
    return accelerate.cpu_offload(AutoModelForCausalLM.from_pretrained(folder), execution_device="cpu")


def _prune(model, method, allocation):
    pruner = MSPPruner(model)
    pruner.prune(MSPConfig(method=method, sparsity=0.6, allocation=allocation, population_size=4, generations=1,
                           fisher_samples=2), calibration=calibration_ids(4, 32), fitness_ids=calibration_ids(2, 32, 7))
    return pruner


@pytest.mark.parametrize("where", ["disk", "cpu-offload"])
@pytest.mark.parametrize("method, allocation", RUNS, ids=[f"{m}-{a}" for m, a in RUNS])
def test_offloaded_models_prune_exactly_like_the_model_in_memory(folder, tmp_path, where, method, allocation):
    reference = _prune(_load(folder, "memory", tmp_path), method, allocation)
    offloaded = _prune(_load(folder, where, tmp_path), method, allocation)
    modules = dict(offloaded.model.named_modules())
    assert any(is_offloaded(modules[name]) for name in offloaded.plan.layers)  # the case under test
    assert offloaded.plan.to_dict() == reference.plan.to_dict()
    expected = dict(reference.model.named_modules())
    for name in reference.plan.layers:
        assert torch.equal(read_matrix(modules[name]), read_matrix(expected[name])), name


@pytest.mark.parametrize("compact", [False, "deflate"])
def test_a_disk_offloaded_prune_saves_and_reloads_verified(folder, tmp_path, compact):
    pruner = _prune(_load(folder, "disk", tmp_path), "wanda", "uniform")
    pruner.save_pretrained(tmp_path / "out", compact=compact)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # verified against the plan on load
    modules = dict(pruner.model.named_modules())
    for name, module in reloaded.named_modules():
        if name in pruner.plan.layers:
            assert torch.equal(read_matrix(module), read_matrix(modules[name])), name


def test_the_offloaded_weights_a_forward_uses_are_the_written_ones(folder, tmp_path):
    model = _load(folder, "disk", tmp_path)
    layer = model.model.layers[1].mlp.down_proj
    assert layer.weight.device.type == "meta" and is_offloaded(layer)
    write_matrix(layer, torch.zeros_like(read_matrix(layer)))
    seen = []  # accelerate puts the placeholder back after the forward: look at what the layer computed
    handle = layer.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
    model(calibration_ids(1, 8))
    handle.remove()
    (layer_input, layer_output), = seen
    assert torch.count_nonzero(layer_input) > 0 and torch.count_nonzero(layer_output) == 0


def test_a_layer_that_cannot_be_written_fails_the_run(folder, tmp_path, monkeypatch):
    import optimum_msp.apply as apply

    monkeypatch.setattr(apply, "write_matrix", lambda module, matrix: None)  # as if the write went nowhere
    with pytest.raises(PlanError, match="model.layers.0"):
        _prune(_load(folder, "disk", tmp_path), "magnitude", "uniform")


@pytest.mark.parametrize("arch", ARCHITECTURES + MIXED_ARCHITECTURES)
def test_blockwise_fisher_equals_the_whole_model_backward(arch):
    model = tiny_model(arch)
    layers = {name: module for block in prunable_layers(model) for name, module in block.items()}
    ids = calibration_ids(3, 16)
    whole = fisher_traces(model, layers, ids, use_cache=False)
    blockwise = fisher_traces(model, layers, ids, use_cache=False, runner=BlockRunner(model), blockwise=True)
    assert blockwise.keys() == whole.keys()
    for name in whole:
        assert blockwise[name] == pytest.approx(whole[name], rel=1e-4), name


def test_bf16_checkpoint_stays_bf16_through_prune_and_save(tmp_path):
    tiny_model("llama").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    pruner = MSPPruner.from_pretrained(tmp_path / "bf16")
    assert next(pruner.model.parameters()).dtype == torch.bfloat16  # loaded in the checkpoint's own dtype
    pruner.prune(MSPConfig(method="sparsegpt", sparsity=0.5), calibration=calibration_ids())
    assert all(p.dtype == torch.bfloat16 for p in pruner.model.parameters())
    pruner.save_pretrained(tmp_path / "out")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch.bfloat16}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    SparsityPlan.from_config(reloaded.config).verify(reloaded)


def test_cli_prunes_a_disk_offloaded_model(folder, tmp_path, capsys):
    from optimum_msp.commands.cli import main

    out = tmp_path / "pruned"
    code = main(["prune", str(folder), "--method", "magnitude", "--sparsity", "0.5", "--eval-windows", "0",
                 "--device-map", json.dumps(DISK_MAP), "--offload-folder", str(tmp_path / "offload"), "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert SparsityPlan.from_config(reloaded.config).verify(reloaded).global_sparsity == pytest.approx(0.5, abs=0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_blocks_computed_on_cuda_from_a_model_on_the_host(folder, tmp_path):
    reference = _prune(_load(folder, "memory", tmp_path), "sparsegpt", "msp")
    model = AutoModelForCausalLM.from_pretrained(folder)  # on the host
    pruner = MSPPruner(model, device="cuda")
    pruner.prune(MSPConfig(method="sparsegpt", sparsity=0.6, allocation="msp", population_size=4, generations=1,
                           fisher_samples=2), calibration=calibration_ids(4, 32), fitness_ids=calibration_ids(2, 32, 7))
    assert next(model.parameters()).device.type == "cpu"  # blocks went back to the host
    assert pruner.plan.planned_sparsity == pytest.approx(0.6, abs=1e-12)
    assert pruner.plan.verify(model).global_sparsity == pytest.approx(reference.plan.achieved_sparsity, abs=1e-3)

"""Where each block is computed: one compute device, or, when a ``device_map`` spreads the blocks over several GPUs
and no device is given, each block where it sits (``BlockRunner.block_device``).

The resolution is tested on the CPU with accelerate's hooks fabricated as ``dispatch_model`` leaves them (an
``AlignDevicesHook`` with an ``execution_device`` on every module the map names), never run; running blocks on two
GPUs needs two GPUs (the last test).
"""

import pytest
import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook

from optimum_msp import MSPConfig, MSPPruner
from optimum_msp.allocation.fisher import fisher_traces
from optimum_msp.apply import apply_targets
from optimum_msp.modeling.blocks import select_linears
from optimum_msp.modeling.offload import block_devices, execution_device, read_matrix
from optimum_msp.modeling.sequential import BlockRunner
from optimum_msp.plan import LayerTarget
from optimum_msp.pruners import get_pruner
from tiny_models import calibration_ids, tiny_model

CUDA = [torch.device("cuda", i) for i in range(3)]


def _hooked(devices):
    """A tiny 3-block LLaMA whose blocks carry the hooks a device_map placing them on ``devices`` leaves (``None``:
    no hook, the block stays on the host)."""
    model = tiny_model("llama")
    for block, device in zip(model.model.layers, devices):
        if device is not None:
            # dispatch_model gives GPU indices; torch.device(0) needs CUDA, "cuda:0" does not
            block._hf_hook = AlignDevicesHook(execution_device=CUDA[device])
    return model


def test_blocks_on_several_gpus_are_each_computed_where_they_sit():
    runner = BlockRunner(_hooked([0, 0, 1]))
    assert [runner.block_device(i) for i in range(3)] == [CUDA[0], CUDA[0], CUDA[1]]
    assert runner.spread and runner.device == CUDA[0]


def test_a_given_device_computes_every_block_there():
    runner = BlockRunner(_hooked([0, 0, 1]), device="cuda:2")
    assert [runner.block_device(i) for i in range(3)] == [CUDA[2]] * 3 and not runner.spread


@pytest.mark.parametrize("devices", [[0, 0, 0], [None, 0, None], [None, None, None]])
def test_blocks_on_at_most_one_accelerator_are_computed_on_the_compute_device(devices):
    """Offloaded to one execution device, or some blocks on the host and some on one GPU: today's behaviour, every
    block on the runner's device (moved there for its turn)."""
    runner = BlockRunner(_hooked(devices))
    assert [runner.block_device(i) for i in range(3)] == [runner.device] * 3 and not runner.spread


def test_a_block_on_the_host_among_gpus_is_computed_on_the_compute_device():
    assert block_devices(_hooked([1, None, 2]).model.layers, CUDA[1]) == [CUDA[1], CUDA[1], CUDA[2]]


def test_a_blocks_device_is_found_on_its_submodules_and_in_sequential_hooks():
    model = tiny_model("llama")
    first, second, third = model.model.layers
    first.self_attn._hf_hook = AlignDevicesHook(execution_device=CUDA[1])  # a map naming the block's parts
    first.mlp._hf_hook = AlignDevicesHook(execution_device=CUDA[1])
    second._hf_hook = SequentialHook(AlignDevicesHook(execution_device=None), AlignDevicesHook(execution_device=CUDA[0]))
    assert [execution_device(block) for block in (first, second, third)] == [CUDA[1], CUDA[0], torch.device("cpu")]


def test_a_model_on_the_host_is_computed_there_as_before():
    runner = BlockRunner(tiny_model("llama"))
    assert [runner.block_device(i) for i in range(3)] == [torch.device("cpu")] * 3 and not runner.spread


def _prune_and_fisher(arch, spread):
    model = tiny_model(arch)
    runner = BlockRunner(model)
    runner.spread = spread  # the path that moves every block's inputs to its device (here all on the host)
    layers = [select_linears(block, f"{runner.block_prefix}.{i}") for i, block in enumerate(runner.blocks)]
    every = {name: module for block in layers for name, module in block.items()}
    traces = fisher_traces(model, every, calibration_ids(2, 16), use_cache=False, runner=runner, blockwise=True)
    targets = {name: LayerTarget(sparsity=0.5) for name in every}
    achieved = apply_targets(runner, layers, targets, get_pruner("sparsegpt"), calibration_ids(3, 16))
    return traces, achieved, {name: read_matrix(module).clone() for name, module in every.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2_sliding"])  # blocks of two layer types: two masks
def test_the_per_block_path_computes_what_the_one_device_path_does(arch):
    """Moving every block's hidden states and arguments to its device (the blocks of a spread model) hands each
    block the same inputs: on one device, the same Fisher traces and pruned weights bit for bit."""
    plain, spread = _prune_and_fisher(arch, False), _prune_and_fisher(arch, True)
    assert plain[0] == spread[0] and plain[1] == spread[1]
    assert all(torch.equal(plain[2][name], spread[2][name]) for name in plain[2])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("method, allocation", [("wanda", "uniform"), ("sparsegpt", "msp")])
def test_blocks_spread_over_two_gpus_prune_like_one_gpu(tmp_path, method, allocation):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    spread = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
              "model.layers.2": 1, "model.norm": 1, "lm_head": 1}
    config = MSPConfig(method=method, sparsity=0.6, allocation=allocation, population_size=4, generations=1,
                       fisher_samples=2)
    runs = []
    for device_map in ({"": 0}, spread):
        pruner = MSPPruner(AutoModelForCausalLM.from_pretrained(folder, device_map=device_map))
        pruner.prune(config, calibration=calibration_ids(4, 32), fitness_ids=calibration_ids(2, 32, 7))
        runs.append(pruner)
    one, two = runs
    runner = BlockRunner(two.model)
    assert [runner.block_device(i) for i in range(3)] == [CUDA[0], CUDA[1], CUDA[1]]
    # every block computed, and left, where the map put it
    assert [next(block.parameters()).device for block in runner.blocks] == [CUDA[0], CUDA[1], CUDA[1]]
    assert two.plan.planned_sparsity == pytest.approx(one.plan.planned_sparsity, abs=1e-12)
    expected = dict(one.model.named_modules())
    for name, module in two.model.named_modules():
        if name in one.plan.layers:
            got, want = read_matrix(module).cpu(), read_matrix(expected[name]).cpu()
            assert (got == 0).float().mean() == pytest.approx(float((want == 0).float().mean()), abs=1e-3), name
            assert (got - want).abs().max() <= 1e-3 * want.abs().max(), name

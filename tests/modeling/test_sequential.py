import pytest
import torch

from optimum_msp.modeling.sequential import BlockRunner, InputStatistics, block_output
from optimum_msp.modeling.blocks import prunable_layers
from tiny_models import ARCHITECTURES, calibration_ids, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_blockwise_run_reproduces_the_model(arch):
    """Captured inputs (hidden states + every kwarg the block needs) replayed block by block give what
    the last block outputs in the model's own forward."""
    model = tiny_model(arch)
    ids = calibration_ids(samples=3, seqlen=16)
    runner = BlockRunner(model)
    inputs = runner.capture(ids, batch_size=2)
    assert len(inputs) == 2 and inputs.hidden[0].shape[0] == 2
    for index in range(len(runner.blocks)):
        runner.advance(index, inputs)

    seen = []
    handle = runner.blocks[-1].register_forward_hook(lambda module, args, output: seen.append(block_output(output)))
    with torch.no_grad():
        model(ids, use_cache=False)
    handle.remove()
    torch.testing.assert_close(torch.cat(inputs.hidden), seen[0], atol=1e-5, rtol=1e-4)


def _first_block(samples: int):
    """A tiny LLaMA's runner, captured inputs of ``samples`` batches, and its first block's linear layers."""
    runner = BlockRunner(tiny_model("llama"))
    inputs = runner.capture(calibration_ids(samples=samples, seqlen=8))
    block = runner.blocks[0]
    return runner, inputs, block, {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


def test_shared_inputs_share_statistics():
    runner, inputs, block, layers = _first_block(samples=2)

    class Count:
        def __init__(self, width):
            self.calls = 0

        def add_batch(self, x):
            self.calls += 1

    with InputStatistics(layers, Count) as collector:
        runner.run_block(0, inputs, on_batch=collector.new_batch, keep=False)
    stats = collector.stats
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert stats["self_attn.o_proj"] is not stats["self_attn.q_proj"]
    assert stats["mlp.down_proj"] is not stats["mlp.up_proj"]
    distinct = {id(s): s for s in stats.values()}
    assert sorted(s.calls for s in distinct.values()) == [2, 2, 2, 2]  # once per batch per distinct input


class _Inputs:
    """Keeps every input a statistics hook is given (the ground truth for early stopping)."""

    def __init__(self, width):
        self.seen = []

    def add_batch(self, x):
        self.seen.append(x.clone())


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_statistics_pass_stops_after_the_last_layer_input(arch):
    model = tiny_model(arch)
    runner = BlockRunner(model)
    inputs = runner.capture(calibration_ids(samples=3, seqlen=8))
    block = runner.blocks[0]
    layers = prunable_layers(model)[0]
    calls = {name: 0 for name in layers}
    handles = [m.register_forward_hook(lambda mod, a, o, n=name: calls.__setitem__(n, calls[n] + 1))
               for name, m in layers.items()]
    with InputStatistics(layers, _Inputs) as collector:
        runner.run_block(0, inputs, on_batch=collector.new_batch, keep=False)
    for handle in handles:
        handle.remove()
    last = collector._order[-1]
    assert calls[last] == 1  # ran in the first batch only; later batches stopped at its input
    assert all(count == 3 for name, count in calls.items() if name != last)
    # every layer still saw its input in all 3 batches, identical to a full forward's
    reference = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=name: reference.setdefault(n, []).append(a[0].clone()))
             for name, m in layers.items()]
    runner.run_block(0, inputs, keep=False)
    for hook in hooks:
        hook.remove()
    for name in layers:
        seen = collector.stats[name].seen
        expected = [x.reshape(-1, x.shape[-1]) for x in reference[name]]
        assert len(seen) == len(expected) == 3, name
        assert all(torch.equal(a, b) for a, b in zip(seen, expected)), name


def test_no_early_stop_when_a_layer_does_not_run():
    runner, inputs, block, layers = _first_block(samples=3)
    layers["never_called"] = torch.nn.Linear(4, 4)  # e.g. an expert no token was routed to
    outputs = []
    handle = block.register_forward_hook(lambda mod, a, out: outputs.append(out))
    with InputStatistics(layers, _Inputs) as collector:
        runner.run_block(0, inputs, on_batch=collector.new_batch, keep=False)
    handle.remove()
    assert len(outputs) == 3  # every batch ran the whole block

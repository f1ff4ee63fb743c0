import pytest
import torch

from optimum_msp.modeling.sequential import BlockRunner, InputStatistics, block_output
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


def test_shared_inputs_share_statistics():
    model = tiny_model("llama")
    runner = BlockRunner(model)
    inputs = runner.capture(calibration_ids(samples=2, seqlen=8))
    block = runner.blocks[0]
    layers = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}

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

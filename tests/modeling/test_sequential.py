import pytest
import torch

from optimum_msp.modeling.sequential import BlockRunner, InputStatistics, batched, block_output
from optimum_msp.modeling.blocks import prunable_layers
from tiny_models import ARCHITECTURES, MIXED_ARCHITECTURES, calibration_ids, tiny_model


def _model_block_outputs(model, blocks, ids, batch_size):
    """Every block's output in the model's own forward, ``[block][batch]`` (the ground truth)."""
    seen = [[] for _ in blocks]
    handles = [block.register_forward_hook(lambda module, args, output, i=i: seen[i].append(block_output(output)))
               for i, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in batched(ids, batch_size):
                model(batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_mixed_architectures_mix_layer_types():
    """The mixed test models really have blocks of several types (else they test nothing)."""
    for arch in MIXED_ARCHITECTURES:
        types = tiny_model(arch).config.layer_types
        assert {"sliding_attention", "full_attention"} <= set(types), arch
        assert types[0] != types[-1], arch  # a block unlike block 0 exists


@pytest.mark.parametrize("arch", ARCHITECTURES + MIXED_ARCHITECTURES)
def test_every_block_reproduces_the_model(arch):
    """Each block, run by the runner with the arguments it gets in the model (attention mask, position
    embeddings: per layer type for sliding/full models), outputs what it outputs in the model's own forward:
    both chained block by block (capture + advance) and fed the model's own hidden states (run_block)."""
    model = tiny_model(arch)
    ids = calibration_ids(samples=3, seqlen=32)
    runner = BlockRunner(model)
    expected = _model_block_outputs(model, runner.blocks, ids, batch_size=2)
    inputs = runner.capture(ids, batch_size=2)
    assert len(inputs) == 2 and inputs.hidden[0].shape[0] == 2
    for index in range(len(runner.blocks)):
        hidden = expected[index - 1] if index else None
        outputs = runner.run_block(index, inputs, hidden=hidden)
        for j, (got, want) in enumerate(zip(outputs, expected[index])):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"run_block {index} batch {j}: {m}")
    for index in range(len(runner.blocks)):
        runner.advance(index, inputs)
        for j, (got, want) in enumerate(zip(inputs.hidden, expected[index])):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"advance {index} batch {j}: {m}")


def test_captured_arguments_are_shared_not_copied():
    """Blocks of one type get the same mask and position embeddings: stored once, referenced per block, and
    across batches too when equal (same positions, no padding)."""
    model = tiny_model("gemma3_text_mixed")
    runner = BlockRunner(model)
    inputs = runner.capture(calibration_ids(samples=3, seqlen=32), batch_size=1)
    types = model.config.layer_types
    full, sliding = types.index("full_attention"), types.index("sliding_attention")
    for j in range(len(inputs)):
        masks = [inputs.call_args(i, j)[1]["attention_mask"] for i in range(len(types))]
        cos = [inputs.call_args(i, j)[1]["position_embeddings"][0] for i in range(len(types))]
        for i, kind in enumerate(types):
            assert masks[i] is masks[types.index(kind)] and cos[i] is cos[types.index(kind)]
        assert not torch.equal(masks[full], masks[sliding]) and not torch.equal(cos[full], cos[sliding])
        first = inputs.call_args(full, 0)[1]
        assert inputs.call_args(full, j)[1]["attention_mask"] is first["attention_mask"]
    assert inputs.args[0] is inputs.call_args(0, 0)[0] and inputs.kwargs[0] is inputs.call_args(0, 0)[1]


def test_stand_in_reads_the_real_blocks_attributes_and_the_blocks_come_back():
    """Model loops may read block attributes (``layer.attention_type``); a stand-in holds no parameters."""
    from optimum_msp.modeling.sequential import StandIn

    model = tiny_model("gemma3_text_mixed")
    runner = BlockRunner(model)
    originals = list(runner.blocks)
    stand_in = StandIn(originals[-1])
    assert stand_in.self_attn is originals[-1].self_attn and stand_in.self_attn.layer_type == "full_attention"
    assert not list(stand_in.parameters())
    runner.capture(calibration_ids(samples=2, seqlen=8))
    assert all(a is b for a, b in zip(runner.blocks, originals))


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

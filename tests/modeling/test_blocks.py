import pytest
import torch
from torch import nn

from optimum_msp.modeling.blocks import (
    NoDecoderBlocksError, find_decoder_blocks, prunable_layers, select_linears, weight_matrix,
)
from tiny_models import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_blocks_found_from_module_tree(arch):
    model = tiny_model(arch)
    name, blocks = find_decoder_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    assert dict(model.named_modules())[name] is blocks
    layers = prunable_layers(model)
    names = [n for block in layers for n in block]
    assert names, "every architecture has prunable linears"
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in names)
    assert all(n.startswith(f"{name}.") for n in names)
    # all linear weights inside blocks and only those
    expected = {f"{name}.{n}" for n, m in blocks.named_modules() if hasattr(m, "weight") and
                type(m).__name__ in ("Linear", "Conv1D")}
    assert set(names) == expected


def test_targets_and_ignore_patterns():
    model = tiny_model("llama")
    block = model.model.layers[0]
    prefix = "model.layers.0"
    everything = select_linears(block, prefix)
    assert len(everything) == 7
    mlp = select_linears(block, prefix, targets=["re:.*mlp.*"])
    assert set(mlp) == {f"{prefix}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    some = select_linears(block, prefix, targets=["q_proj", "mlp.down_proj"], ignore=[])
    assert set(some) == {f"{prefix}.self_attn.q_proj", f"{prefix}.mlp.down_proj"}
    rest = select_linears(block, prefix, ignore=["re:.*self_attn\\.(k|v)_proj", "down_proj"])
    assert len(rest) == 4


def test_conv1d_weight_is_viewed_as_out_by_in():
    model = tiny_model("gpt2")
    c_fc = model.transformer.h[0].mlp.c_fc  # Conv1D(nf=128, nx=64): weight [64, 128]
    view = weight_matrix(c_fc)
    assert view.shape == (128, 64)
    view[0, 0] = 0.0
    assert c_fc.weight[0, 0] == 0.0


class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


def test_model_without_blocks_gets_clear_error():
    with pytest.raises(NoDecoderBlocksError, match="block_name="):
        find_decoder_blocks(NoBlocks())
    with pytest.raises(NoDecoderBlocksError, match="not a non-empty nn.ModuleList"):
        find_decoder_blocks(tiny_model("llama"), block_name="model.norm")


def test_base_model_is_a_hub_id_or_nothing(tmp_path):
    import json

    from optimum_msp.modeling import base_model_id

    assert base_model_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("org/model") == "org/model"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert base_model_id(tmp_path) is None  # a local path is not a base model a card can link to
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "org/origin"}))
    assert base_model_id(tmp_path) == "org/origin"
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path)}))
    assert base_model_id(tmp_path) is None

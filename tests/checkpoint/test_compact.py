"""Compact checkpoints: values + bitmask / N:M indices, reloaded bit-exactly through ``from_pretrained``."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from optimum_msp import MSPConfig, MSPPruner, PlanError, SparsityPlan
from optimum_msp.checkpoint import checkpoint_marker, compact_quantization_config, save_compact
from optimum_msp.checkpoint import codec as codec_module
from optimum_msp.checkpoint import encode_module as encode_layer
from optimum_msp.checkpoint.codec import CompactFormatError, decode_layer, pack_codes, unpack_codes
from optimum_msp.utils.memory import release_file_pages
from optimum_msp.modeling.blocks import prunable_layers
from tiny_models import calibration_ids, tiny_model


def _pruned(arch: str, dtype: torch.dtype = torch.float32, **config):
    model = tiny_model(arch)
    MSPPruner(model).prune(MSPConfig(method="magnitude", **config))
    return model.to(dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits, except that a zero may come back as +0.0 (documented)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return bool(((a.view(ints) == b.view(ints)) | ((a == 0) & (b == 0))).all())


def _file_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# --------------------------------------------------------------------------------------------- primitives
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_codes_round_trip(bits):
    codes = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


def test_pack_codes_layout_is_lsb_first():
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [0b10000001, 0b1]
    assert pack_codes(torch.tensor([3, 0, 1, 2]), 2).tolist() == [0b10010011]  # 2-bit indices for M=4


@pytest.mark.parametrize("target", [None, (2, 4), (2, 8), (3, 8)])
def test_chunked_decoding_matches(target, monkeypatch):
    """Large layers are (un)packed in chunks; force tiny chunks to exercise the boundaries."""
    from optimum_msp.plan import LayerTarget
    from optimum_msp.masks import nm_mask, unstructured_mask

    module = torch.nn.Linear(48, 40, bias=False)
    scores = torch.rand(40, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        module.weight.mul_(nm_mask(scores, *target) if target else unstructured_mask(scores, 0.7))
    layer_target = LayerTarget.nm(*target) if target else None
    expected = encode_layer(module, layer_target)
    monkeypatch.setattr(codec_module, "CHUNK", 64)
    encoded = encode_layer(module, layer_target)
    for key, value in encoded.items():
        assert torch.equal(value, expected[key]), key
    assert _same_bits(decode_layer(encoded, (40, 48)), module.weight.detach())


def test_nm_encoding_uses_small_indices():
    model = _pruned("llama", torch.bfloat16, pattern="2:8")
    module = dict(model.named_modules())["model.layers.0.mlp.up_proj"]
    encoded = encode_layer(module, _target(2, 8))
    assert "weight_msp_index" in encoded and "weight_msp_mask" not in encoded
    numel = module.weight.numel()
    assert encoded["weight"].numel() == numel // 4  # 2 value slots per group of 8
    assert encoded["weight_msp_index"].numel() == numel // 4 * 3 // 8  # 3 bits per slot
    assert _same_bits(decode_layer(encoded, module.weight.shape), module.weight.detach())


def _target(n, m):
    from optimum_msp.plan import LayerTarget

    return LayerTarget.nm(n, m)


def test_dense_layer_stays_dense():
    module = torch.nn.Linear(64, 64)
    assert encode_layer(module) is None  # nothing pruned: the compact form would be bigger


def test_decode_rejects_corruption():
    module = torch.nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        module.weight[:, ::2] = 0
    encoded = encode_layer(module)
    broken = dict(encoded, weight=encoded["weight"][:-1])
    with pytest.raises(CompactFormatError, match="bitmask keeps"):
        decode_layer(broken)
    with pytest.raises(CompactFormatError, match="does not match"):
        decode_layer(encoded, (16, 8))


# ---------------------------------------------------------------------------------------- whole checkpoints
CASES = [
    ("llama", torch.float32, dict(sparsity=0.5)),
    ("llama", torch.bfloat16, dict(sparsity=0.75)),
    ("llama", torch.bfloat16, dict(pattern="2:4")),
    ("gpt2", torch.float32, dict(pattern="2:4")),  # Conv1D: N:M groups run along the transposed dimension
    ("gpt2", torch.bfloat16, dict(sparsity=0.6)),
    ("opt", torch.bfloat16, dict(pattern="2:8")),
]


@pytest.mark.parametrize("codec", [None, "deflate"])
@pytest.mark.parametrize("arch, dtype, config", CASES, ids=[f"{a}-{str(d)[6:]}-{c}" for a, d, c in CASES])
def test_compact_round_trip_is_exact(arch, dtype, config, codec, tmp_path):
    model = _pruned(arch, dtype, **config)
    before = model.config.to_dict()
    save_compact(model, tmp_path / "compact", codec=codec)
    saved = json.loads((tmp_path / "compact" / "config.json").read_text())
    assert saved["quantization_config"] == compact_quantization_config()
    assert saved["msp_checkpoint"] == checkpoint_marker("compact")
    after = model.config.to_dict()
    for key in ("quantization_config", "msp_checkpoint", "sparsity_plan"):  # the model in memory keeps its own
        assert after.get(key) == before.get(key)
    assert after["msp_checkpoint"] == checkpoint_marker("dense") and "quantization_config" not in after

    encodings = set()
    with safe_open(str(tmp_path / "compact" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        pruned = [name for block in prunable_layers(model) for name in block]
        for name in pruned:
            meta = handle.get_tensor(f"{name}.weight_msp_meta").tolist()
            encodings.add(meta[0])
            assert len(meta) == (8 if codec else 6), name
            assert (f"{name}.weight_msp_zsizes" in keys) == bool(codec)
            assert (handle.get_tensor(f"{name}.weight").dtype == torch.uint8) == bool(codec)
    assert encodings == ({codec_module.NM} if "pattern" in config else {codec_module.BITMASK})

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compact", attn_implementation="eager")
    assert reloaded.dtype == dtype
    expected = model.state_dict()
    state = reloaded.state_dict()
    assert state.keys() == expected.keys()
    for key, value in state.items():
        assert _same_bits(value, expected[key]), key
    # same logits as the dense checkpoint (non-persistent buffers such as RoPE's are rebuilt on load, so the
    # reference is the dense checkpoint reloaded, not the in-memory model cast with .to(dtype))
    model.save_pretrained(tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", attn_implementation="eager")
    ids = calibration_ids(samples=2, seqlen=16, seed=2)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, dense(ids).logits)
    assert reloaded.config.msp_checkpoint == checkpoint_marker("dense")  # dense in memory, saved back dense
    assert getattr(reloaded.config, "quantization_config", None) is None
    assert getattr(reloaded, "hf_quantizer", None) is None


def _wide_llama():
    """A tiny Llama whose linear layers hold most of the weights, as in real LLMs (tiny_model's embeddings and
    safetensors header would dominate a whole-file ratio)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=96, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("config, limit", [(dict(sparsity=0.5), 0.65), (dict(sparsity=0.75), 0.40)])
def test_compact_size_ratio_bf16(config, limit, tmp_path):
    model = _wide_llama()
    MSPPruner(model).prune(MSPConfig(method="magnitude", **config))
    model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "dense")
    save_compact(model, tmp_path / "compact")
    ratio = _file_bytes(tmp_path / "compact") / _file_bytes(tmp_path / "dense")
    assert ratio <= limit
    # the pruned layers alone: 1 mask bit per weight + 16 bits per kept weight
    layer_bytes = {}
    for kind in ("dense", "compact"):
        with safe_open(str(tmp_path / kind / "model.safetensors"), "pt") as handle:
            layer_bytes[kind] = sum(
                handle.get_tensor(k).numel() * handle.get_tensor(k).element_size()
                for k in handle.keys() if ".layers." in k and "_proj." in k
            )
    expected = (1 - config["sparsity"]) + 1 / 16
    assert layer_bytes["compact"] / layer_bytes["dense"] == pytest.approx(expected, abs=0.01)


def test_pruner_save_compact_and_sharding(tmp_path):
    pruner = MSPPruner(tiny_model("llama"))
    pruner.prune(MSPConfig(method="magnitude", pattern="2:4"))
    folder = pruner.save_pretrained(tmp_path / "out", compact=True, max_shard_size="100KB")
    assert (folder / "msp_config.json").is_file()
    assert (folder / "model.safetensors.index.json").is_file()  # sharded, through save_pretrained
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    for key, value in reloaded.state_dict().items():
        assert _same_bits(value, pruner.model.state_dict()[key]), key


def test_model_loaded_from_compact_saves_dense_and_compact_again(tmp_path):
    model = _pruned("gpt2", torch.float32, pattern="2:4")
    save_compact(model, tmp_path / "compact")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compact")
    reloaded.save_pretrained(tmp_path / "dense")  # the decompression step must not be "reverted" on save
    tensors = load_file(tmp_path / "dense" / "model.safetensors")
    assert not any("_msp_" in key for key in tensors)
    save_compact(reloaded, tmp_path / "compact-again")
    for folder in ("dense", "compact-again"):
        again = AutoModelForCausalLM.from_pretrained(tmp_path / folder)
        for key, value in again.state_dict().items():
            assert _same_bits(value, model.state_dict()[key]), (folder, key)


def test_corrupted_compact_checkpoint_names_the_layer(tmp_path):
    model = _pruned("llama", torch.float32, sparsity=0.5)
    save_compact(model, tmp_path / "compact")
    path = tmp_path / "compact" / "model.safetensors"
    tensors = load_file(path)
    layer = "model.layers.1.self_attn.v_proj"
    tensors[f"{layer}.weight_msp_mask"][0] ^= 0b100  # one more (or fewer) kept weight than stored values
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(PlanError, match=rf"{layer}.*cannot be decoded"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "compact")


def test_compact_bitmask_that_breaks_the_plan_is_named(tmp_path):
    model = _pruned("llama", torch.float32, pattern="2:4")
    save_compact(model, tmp_path / "compact")
    path = tmp_path / "compact" / "model.safetensors"
    tensors = load_file(path)
    layer = "model.layers.0.mlp.gate_proj"
    # re-encode the layer as a bitmask with one pruned weight revived: decodes fine, but breaks 2:4
    weight = dict(model.named_modules())[layer].weight.detach().clone()
    row, col = (weight[:, :4] == 0).nonzero()[0].tolist()
    weight[row, col] = 0.5
    module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    module.weight.data = weight
    for suffix in ("weight", "weight_msp_index", "weight_msp_meta"):
        tensors.pop(f"{layer}.{suffix}")
    tensors.update({f"{layer}.{k}": v for k, v in encode_layer(module).items()})
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(PlanError, match=rf"{layer}.*2:4"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "compact")


def test_save_compact_needs_a_plan(tmp_path):
    with pytest.raises(ValueError, match="sparsity_plan"):
        save_compact(tiny_model("llama"), tmp_path / "x")


def test_serialized_names_are_consistent():
    assert codec_module.SERIALIZED_NAMES[0] == "weight"
    assert all(name.startswith("weight_msp_") for name in codec_module.SERIALIZED_NAMES[1:])


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="madvise path is Linux-only")
def test_release_file_pages_only_touches_mapped_checkpoint_files(tmp_path):
    data = torch.arange(64 * 1024, dtype=torch.int32)  # 256 KiB: many whole pages
    path = tmp_path / "x.safetensors"
    path.write_bytes(data.numpy().tobytes())
    storage = torch.UntypedStorage.from_file(str(path), False, path.stat().st_size)  # how safetensors maps it
    mapped = torch.empty(0, dtype=torch.int32).set_(storage.untyped()).view(torch.int32)
    assert torch.equal(mapped, data)
    assert release_file_pages(mapped) > 0
    assert torch.equal(mapped, data)  # released pages fault back in from the file
    anonymous = data.clone()
    assert release_file_pages(anonymous) == 0 and torch.equal(anonymous, data)
    other = tmp_path / "x.bin"
    other.write_bytes(data.numpy().tobytes())
    storage = torch.UntypedStorage.from_file(str(other), False, other.stat().st_size)
    foreign = torch.empty(0, dtype=torch.uint8).set_(storage)
    assert release_file_pages(foreign) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8])
def test_deflate_round_trip_across_blocks(dtype, monkeypatch):
    monkeypatch.setattr(codec_module, "DEFLATE_BLOCK", 7)  # several blocks and a partial last one
    torch.manual_seed(0)
    values = (torch.randn(50) * 100).to(dtype)
    data, sizes = codec_module.deflate(values)
    assert data.dtype == torch.uint8 and len(sizes) == 8 * values.element_size()
    assert _same_bits(codec_module.inflate(data, sizes, dtype, values.numel()), values)
    empty, no_sizes = codec_module.deflate(values[:0])
    assert codec_module.inflate(empty, no_sizes, dtype, 0).numel() == 0


def test_deflate_corruption_is_a_format_error():
    values = torch.randn(1000).to(torch.bfloat16)
    data, sizes = codec_module.deflate(values)
    broken = data.clone()
    broken[3] ^= 0xFF
    with pytest.raises(CompactFormatError):
        codec_module.inflate(broken, sizes, torch.bfloat16, 1000)
    with pytest.raises(CompactFormatError, match="streams"):
        codec_module.inflate(data, sizes[:-1], torch.bfloat16, 1000)
    with pytest.raises(CompactFormatError, match="bytes"):
        codec_module.inflate(data, sizes, torch.bfloat16, 999)
    bomb = zlib.compress(bytes(10**7))  # 10 MB of zeros in ~10 kB: must not be expanded past its 10-byte slot
    with pytest.raises(CompactFormatError, match="exactly 10 bytes"):
        codec_module.inflate(torch.frombuffer(bytearray(bomb), dtype=torch.uint8), [len(bomb)], torch.uint8, 10)


def test_deflated_bf16_checkpoint_loads_as_float32_and_is_smaller(tmp_path):
    model = _wide_llama()
    MSPPruner(model).prune(MSPConfig(method="magnitude", sparsity=0.5))
    model = model.to(torch.bfloat16)
    save_compact(model, tmp_path / "sparse")
    pruner = MSPPruner(model)
    pruner.plan = SparsityPlan.from_config(model.config)
    pruner.save_pretrained(tmp_path / "deflate", compact="deflate")
    assert _file_bytes(tmp_path / "deflate") < 0.9 * _file_bytes(tmp_path / "sparse")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "deflate", dtype=torch.float32)
    assert reloaded.dtype == torch.float32
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key].float()), key
    with pytest.raises(ValueError, match="compact must be"):
        pruner.save_pretrained(tmp_path / "bad", compact="zip")


def test_corrupted_deflate_stream_names_the_layer(tmp_path):
    model = _pruned("llama", torch.float32, sparsity=0.5)
    save_compact(model, tmp_path / "compact", codec="deflate")
    path = tmp_path / "compact" / "model.safetensors"
    tensors = load_file(path)
    layer = "model.layers.1.mlp.up_proj"
    tensors[f"{layer}.weight"][10:20] ^= 0x5A
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(PlanError, match=rf"{layer}.*cannot be decoded"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "compact")


def test_missing_meta_tensor_is_named_not_an_attribute_error(tmp_path):
    model = _pruned("llama", torch.float32, sparsity=0.5)
    save_compact(model, tmp_path / "compact")
    path = tmp_path / "compact" / "model.safetensors"
    tensors = load_file(path)
    layer = "model.layers.0.mlp.up_proj"
    del tensors[f"{layer}.weight_msp_meta"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(PlanError, match=rf"{layer}.*cannot be decoded.*'weight_msp_meta' is missing"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "compact")


def test_nm_with_an_m_beyond_byte_indices_saves_compact_and_reloads(tmp_path):
    """256:512 needs 9-bit positions: stored with a bitmask (smaller there anyway) instead of failing the save."""
    model = tiny_model("llama", hidden_size=512, intermediate_size=512, head_dim=128)
    MSPPruner(model).prune(MSPConfig(method="magnitude", pattern="256:512"))
    save_compact(model, tmp_path / "compact")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compact")
    for key, value in reloaded.state_dict().items():
        assert _same_bits(value, model.state_dict()[key]), key
    with safe_open(str(tmp_path / "compact" / "model.safetensors"), framework="pt") as handle:
        assert any(key.endswith("weight_msp_mask") for key in handle.keys())

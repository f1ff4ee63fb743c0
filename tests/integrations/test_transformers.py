"""Prune-on-load through ``from_pretrained(quantization_config=MSPConfig(...))`` and verification on reload."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_msp
from optimum_msp import MSPConfig, MSPPruner, PlanError, SparsityPlan
from optimum_msp.checkpoint import compact_quantization_config, save_compact
from optimum_msp.integrations.transformers import (
    MSPCheckpointConfig,
    MSPHfQuantizer,
    calibration_data,
    checkpoint_marker,
    install_load_hook,
    register,
)
from tiny_models import VOCAB, calibration_ids, tiny_model
from without_msp import run_without_optimum_msp

WORDS = [f"w{i}" for i in range(VOCAB - 2)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(WORDS)} | {"<unk>": VOCAB - 2, "<eos>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, len(WORDS), (120, 12), generator=generator)
    path = tmp_path_factory.mktemp("data") / "calibration.txt"
    path.write_text("\n".join(" ".join(WORDS[i] for i in row) for row in ids.tolist()) + "\n")
    return path


def _dense_folder(root: Path, arch: str, with_tokenizer: bool = True) -> Path:
    folder = root / f"{arch}-dense"
    if not folder.exists():
        tiny_model(arch).save_pretrained(folder)
        if with_tokenizer:
            _tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dense_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dense")


def _config(calibration_file: Path, **kwargs) -> MSPConfig:
    defaults = dict(method="wanda", sparsity=0.6, calibration_dataset=str(calibration_file),
                    num_calibration_samples=4, seqlen=32)
    return MSPConfig(**{**defaults, **kwargs})


def _assert_plain(model) -> None:
    """What a model loaded without any quantizer looks like."""
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)
    assert not hasattr(model, "quantization_method")
    assert not hasattr(model.config, "_is_quantized")
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.msp_checkpoint == checkpoint_marker("dense")


def _logits(model, seed: int = 5) -> torch.Tensor:
    with torch.no_grad():
        return model(calibration_ids(samples=2, seqlen=16, seed=seed)).logits


# ------------------------------------------------------------------------------------------- registration
def test_import_registers_msp():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING["msp"] is MSPHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["msp"] is MSPCheckpointConfig
    register()  # idempotent
    # the registered config class builds the marker, and an MSPConfig from a full pruning config
    assert isinstance(MSPCheckpointConfig.from_dict(compact_quantization_config()), MSPCheckpointConfig)
    assert isinstance(MSPCheckpointConfig.from_dict(MSPConfig(method="magnitude").to_dict()), MSPConfig)
    with pytest.raises(ValueError, match="checkpoint_format"):
        MSPCheckpointConfig.from_dict({"quant_method": "msp", "checkpoint_format": "zip"})


# ------------------------------------------------------------------------------------------ prune-on-load
@pytest.mark.parametrize("arch, kwargs", [("llama", {}), ("gpt2", dict(sparsity=None, pattern="2:4"))])
def test_prune_on_load_matches_pruner(arch, kwargs, dense_root, calibration_file):
    folder = _dense_folder(dense_root, arch)
    config = _config(calibration_file, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)

    reference = AutoModelForCausalLM.from_pretrained(folder)
    MSPPruner(reference, AutoTokenizer.from_pretrained(folder)).prune(_config(calibration_file, **kwargs))

    expected = reference.state_dict()
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    for key, value in state.items():
        assert torch.equal(value, expected[key]), key
    assert loaded.config.sparsity_plan == reference.config.sparsity_plan
    SparsityPlan.from_config(loaded.config).verify(loaded)
    assert SparsityPlan.from_config(loaded.config).achieved_sparsity == pytest.approx(config.sparsity, abs=0.02)
    _assert_plain(loaded)
    # a normal model: casts and runs in bf16
    assert loaded.to(torch.bfloat16).dtype == torch.bfloat16
    assert torch.isfinite(_logits(loaded).float()).all()


def test_prune_on_load_with_calibration_context(dense_root, calibration_file, tmp_path):
    folder = tmp_path / "no-tokenizer"
    tiny_model("llama").save_pretrained(folder)  # no tokenizer in the folder: the context provides the data
    ids = calibration_ids(samples=4, seqlen=32, seed=1)
    config = _config(calibration_file, sparsity=0.5)
    with calibration_data(ids):
        loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    reference = AutoModelForCausalLM.from_pretrained(folder)
    MSPPruner(reference).prune(_config(calibration_file, sparsity=0.5), calibration=ids)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key

    # outside the context the tokenizer is needed, and its absence is explained
    with pytest.raises(ValueError, match="calibration_data"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=_config(calibration_file))


def test_prune_on_load_data_free_needs_no_tokenizer(tmp_path):
    folder = tmp_path / "bare"
    tiny_model("llama").save_pretrained(folder)
    config = MSPConfig(method="magnitude", sparsity=0.5)
    loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    plan = SparsityPlan.from_config(loaded.config)
    assert plan.verify(loaded).global_sparsity == pytest.approx(0.5, abs=0.01)
    assert plan.method == "magnitude" and plan.calibration["num_samples"] == 0  # no data was drawn


def test_calibration_data_validates():
    with pytest.raises(ValueError):
        with calibration_data(torch.rand(2, 8)):
            pass
    with pytest.raises(ValueError):
        with calibration_data():
            pass


# --------------------------------------------------------------------------------------- save and reload
@pytest.fixture(scope="module")
def pruned_folder(dense_root, calibration_file) -> Path:
    """A 2:4 checkpoint written by ``save_pretrained`` of a model pruned while loading."""
    model = AutoModelForCausalLM.from_pretrained(_dense_folder(dense_root, "llama"),
                                                 quantization_config=_config(calibration_file, sparsity=None,
                                                                             pattern="2:4"))
    folder = dense_root / "llama-pruned"
    model.save_pretrained(folder)
    torch.save(_logits(model), folder / "expected_logits.pt")
    return folder


def test_save_reload_identical_logits(pruned_folder):
    config = json.loads((pruned_folder / "config.json").read_text())
    assert config["msp_checkpoint"] == checkpoint_marker("dense") and "quantization_config" not in config
    assert config["sparsity_plan"]["pattern"] == "n:m"
    reloaded = AutoModelForCausalLM.from_pretrained(pruned_folder)
    _assert_plain(reloaded)
    assert torch.equal(_logits(reloaded), torch.load(pruned_folder / "expected_logits.pt"))
    # reloading it again after a second save still verifies
    reloaded.save_pretrained(pruned_folder.parent / "again")
    again = AutoModelForCausalLM.from_pretrained(pruned_folder.parent / "again")
    assert torch.equal(_logits(again), torch.load(pruned_folder / "expected_logits.pt"))


def test_reload_runs_verification(pruned_folder, monkeypatch):
    calls = []
    original = SparsityPlan.verify
    monkeypatch.setattr(SparsityPlan, "verify",
                        lambda self, model, **kwargs: calls.append(1) or original(self, model, **kwargs))
    AutoModelForCausalLM.from_pretrained(pruned_folder)
    assert calls == [1]


def _tampered_copy(source: Path, destination: Path) -> Path:
    destination.mkdir()
    for path in source.iterdir():
        (destination / path.name).write_bytes(path.read_bytes())
    return destination


def _edit_plan(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config["sparsity_plan"])
    (folder / "config.json").write_text(json.dumps(config))


def test_flipped_weight_in_nm_group_is_named(pruned_folder, tmp_path):
    folder = _tampered_copy(pruned_folder, tmp_path / "flipped")
    tensors = load_file(folder / "model.safetensors")
    layer = "model.layers.1.mlp.down_proj"
    weight = tensors[f"{layer}.weight"]
    row, col = (weight[:, :4] == 0).nonzero()[0].tolist()  # a pruned weight inside the first group of a row
    weight[row, col] = 0.125
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PlanError, match=rf"{layer}.*2:4"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_plan_naming_missing_layer_is_named(pruned_folder, tmp_path):
    folder = _tampered_copy(pruned_folder, tmp_path / "missing")
    _edit_plan(folder, lambda plan: plan["layers"].update(
        {"model.layers.9.mlp.up_proj": {"sparsity": 0.5, "numel": 8192, "n": 2, "m": 4}}))
    with pytest.raises(PlanError, match=r"model\.layers\.9\.mlp\.up_proj"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_plan_with_impossible_sparsity_is_named(pruned_folder, tmp_path):
    folder = _tampered_copy(pruned_folder, tmp_path / "impossible")

    def edit(plan):
        layer = plan["layers"]["model.layers.0.self_attn.q_proj"]
        layer.pop("n"), layer.pop("m")
        layer["sparsity"] = 1.5

    _edit_plan(folder, edit)
    with pytest.raises(PlanError, match=r"model\.layers\.0\.self_attn\.q_proj.*1\.5"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_forged_plan_claiming_more_sparsity_is_named(pruned_folder, tmp_path):
    folder = _tampered_copy(pruned_folder, tmp_path / "forged")

    def edit(plan):
        layer = plan["layers"]["model.layers.2.self_attn.o_proj"]
        layer.update(n=1, m=4, sparsity=0.75, achieved=0.75)

    _edit_plan(folder, edit)
    with pytest.raises(PlanError, match=r"model\.layers\.2\.self_attn\.o_proj.*1:4"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_marker_without_plan_is_an_error(pruned_folder, tmp_path):
    folder = _tampered_copy(pruned_folder, tmp_path / "no-plan")
    config = json.loads((folder / "config.json").read_text())
    del config["sparsity_plan"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PlanError, match="sparsity_plan"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_pruner_save_pretrained_marks_the_checkpoint(tmp_path):
    pruner = MSPPruner(tiny_model("llama"))
    pruner.prune(MSPConfig(method="magnitude", sparsity=0.5))
    folder = pruner.save_pretrained(tmp_path / "out")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["msp_checkpoint"] == checkpoint_marker("dense") and "quantization_config" not in saved
    reloaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    assert torch.equal(_logits(reloaded), _logits(pruner.model))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_dense_weights_behind_an_edited_achieved_are_refused_on_load(method, tmp_path):
    """Weights swapped for dense ones and every `achieved` edited to 0.0 (targets kept): the weights are held to
    the targets, not to what the file reports."""
    pruner = MSPPruner(tiny_model("llama"))
    pruner.prune(MSPConfig(method=method, sparsity=0.5), calibration=calibration_ids())
    folder = pruner.save_pretrained(tmp_path / "out")
    tensors = load_file(folder / "model.safetensors")
    dense = tiny_model("llama").state_dict()
    layer = "model.layers.2.self_attn.o_proj"
    tensors[f"{layer}.weight"] = dense[f"{layer}.weight"].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    def edit(plan):
        for entry in plan["layers"].values():
            entry["achieved"] = 0.0
        plan["achieved_sparsity"] = 0.0

    _edit_plan(folder, edit)
    with pytest.raises(PlanError, match=rf"{layer}.*requires 0\.5 sparsity"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_deeply_nested_plan_entry_is_refused_on_load(pruned_folder, tmp_path):
    folder = _tampered_copy(pruned_folder, tmp_path / "nested")
    deep: list = []
    for _ in range(100):  # transformers itself copes with this depth; the plan's parser refuses it
        deep = [deep]
    _edit_plan(folder, lambda plan: plan["calibration"].update(notes=deep))
    with pytest.raises(PlanError, match="'calibration' is nested deeper than 8 levels"):
        AutoModelForCausalLM.from_pretrained(folder)


# ---------------------------------------------------------------------------- without optimum_msp installed
STOCK_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    warnings.simplefilter("always")
    import torch
    from transformers import AutoModelForCausalLM
    dense, compact, logits_file = sys.argv[1:4]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLM.from_pretrained(dense)
    assert not caught, [str(w.message) for w in caught]
    assert "optimum_msp" not in sys.modules
    assert getattr(model, "hf_quantizer", None) is None
    ids = torch.load(logits_file)["ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, torch.load(logits_file)["logits"]), "logits differ"
    print("DENSE-LOADED", file=sys.stderr, flush=True)  # splits stderr: the dense load's messages come before
    try:
        AutoModelForCausalLM.from_pretrained(compact)
    except RuntimeError as error:
        print("COMPACT-REFUSED", error)
    else:
        raise SystemExit("stock transformers silently loaded a compact checkpoint")
    print("STOCK-OK")
    """
)


def test_stock_transformers_loads_pruned_checkpoint_as_dense(pruned_folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(pruned_folder)
    ids = calibration_ids(samples=2, seqlen=16, seed=5)
    torch.save({"ids": ids, "logits": _logits(model)}, tmp_path / "reference.pt")
    save_compact(model, tmp_path / "compact")
    result = run_without_optimum_msp(STOCK_SCRIPT, pruned_folder, tmp_path / "compact", tmp_path / "reference.pt",
                                     tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "STOCK-OK" in result.stdout
    assert "COMPACT-REFUSED" in result.stdout
    # the dense load said nothing: no warning, and no log line about an unknown quantization method
    dense_part = result.stderr.split("DENSE-LOADED")[0].lower()
    assert "quantization" not in dense_part and "warn" not in dense_part, dense_part[-2000:]


# ------------------------------------------------------------------------------------------- the load hook
def test_explicit_checkpoint_config_verifies_an_unmarked_checkpoint(pruned_folder, tmp_path):
    """``quantization_config=MSPCheckpointConfig()`` verifies a checkpoint that has a plan but no marker."""
    folder = _tampered_copy(pruned_folder, tmp_path / "unmarked")
    config = json.loads((folder / "config.json").read_text())
    del config["msp_checkpoint"]
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    layer = "model.layers.0.mlp.up_proj"
    tensors[f"{layer}.weight"] = torch.ones_like(tensors[f"{layer}.weight"])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    AutoModelForCausalLM.from_pretrained(folder)  # no marker: not verified
    with pytest.raises(PlanError, match=layer):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=MSPCheckpointConfig())


def test_hook_leaves_a_callers_quantization_config_alone(pruned_folder, calibration_file, monkeypatch):
    """Prune-on-load of a marked checkpoint prunes it again (the hook only acts when no config was passed)."""
    calls = []
    original = SparsityPlan.verify
    monkeypatch.setattr(SparsityPlan, "verify",
                        lambda self, model, **kwargs: calls.append(self.method) or original(self, model, **kwargs))
    config = MSPConfig(method="magnitude", sparsity=0.75)
    loaded = AutoModelForCausalLM.from_pretrained(pruned_folder, quantization_config=config)
    plan = SparsityPlan.from_config(loaded.config)
    assert plan.method == "magnitude" and plan.target_sparsity == 0.75
    assert calls == ["magnitude"]  # the prune's own check; the 2:4 plan on file was not verified
    _assert_plain(loaded)


def test_unsupported_marker_version_is_refused(pruned_folder, tmp_path):
    folder = _tampered_copy(pruned_folder, tmp_path / "v2")
    config = json.loads((folder / "config.json").read_text())
    config["msp_checkpoint"]["format_version"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version 2 is not supported"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_load_hook_is_installed_once():
    from transformers import modeling_utils
    from transformers.quantizers.auto import get_hf_quantizer

    assert install_load_hook() and install_load_hook()
    hook = modeling_utils.get_hf_quantizer
    assert hook._optimum_msp and hook.__wrapped__ is get_hf_quantizer  # wraps transformers' own, never itself


def test_optimum_msp_exports():
    assert optimum_msp.SparsityPreservingCallback.__name__ == "SparsityPreservingCallback"

"""The checkpoint marker: where it sits, the older ``quantization_config`` marker's read path, and pruned
checkpoints loading in the tools users evaluate with (stock transformers, lm-eval, vLLM's config parsing)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from optimum_msp import MSPConfig, MSPPruner, PlanError, SparsityPlan
from optimum_msp.checkpoint import (
    MARKER_KEY, checkpoint_marker, compact_quantization_config, mark_pruned, marker_format, save_compact,
)
from tiny_models import calibration_ids, tiny_model, word_tokenizer
from without_msp import run_without_optimum_msp

#: what checkpoints saved by optimum-msp up to 0.1 carried instead of the top-level marker
LEGACY_MARKER = {"quant_method": "msp", "checkpoint_format": "dense", "format_version": 1}
TAMPERED_LAYER = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory) -> Path:
    """A tiny Llama pruned to 50 % (magnitude), saved by ``MSPPruner`` with its tokenizer."""
    pruner = MSPPruner(tiny_model("llama"), word_tokenizer(adds_bos=False))
    pruner.prune(MSPConfig(method="magnitude", sparsity=0.5))
    return pruner.save_pretrained(tmp_path_factory.mktemp("marker") / "pruned", plot=False)


def _copy(source: Path, destination: Path) -> Path:
    destination.mkdir()
    for path in source.iterdir():
        if path.is_file():
            (destination / path.name).write_bytes(path.read_bytes())
    return destination


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def _as_legacy(folder: Path) -> None:
    """Rewrite ``config.json`` the way optimum-msp 0.1 saved it: the marker in ``quantization_config``."""
    def edit(config):
        del config[MARKER_KEY]
        config["quantization_config"] = dict(LEGACY_MARKER)

    _edit_config(folder, edit)


def _tamper(folder: Path) -> None:
    """Give a pruned weight of ``TAMPERED_LAYER`` a value: the layer no longer holds its 50 %."""
    tensors = load_file(folder / "model.safetensors")
    weight = tensors[f"{TAMPERED_LAYER}.weight"]
    weight[weight == 0] = 0.5
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def verify_calls(monkeypatch):
    calls = []
    original = SparsityPlan.verify
    monkeypatch.setattr(SparsityPlan, "verify",
                        lambda self, model, **kwargs: calls.append(1) or original(self, model, **kwargs))
    return calls


# -------------------------------------------------------------------------------------------- the marker
def test_dense_checkpoint_has_no_quantization_config(pruned_folder):
    config = json.loads((pruned_folder / "config.json").read_text())
    assert "quantization_config" not in config  # what lm-eval and vLLM resolve (and refuse for unknown methods)
    assert config[MARKER_KEY] == {"checkpoint_format": "dense", "format_version": 1}
    assert "sparsity_plan" in config


def test_marker_format_reads_both_places():
    config = tiny_model("llama").config
    assert marker_format(config) is None
    config.sparsity_plan = {"layers": {}}
    config.quantization_config = dict(LEGACY_MARKER)
    assert marker_format(config) == "dense"
    mark_pruned(config, "compact")
    assert marker_format(config) == "compact" and config.quantization_config == compact_quantization_config()
    mark_pruned(config)  # dense: the msp quantization_config goes, the top-level marker stays
    assert getattr(config, "quantization_config", None) is None and marker_format(config) == "dense"


def test_mark_pruned_keeps_someone_elses_quantization_config():
    config = tiny_model("llama").config
    config.sparsity_plan = {"layers": {}}
    config.quantization_config = {"quant_method": "bitsandbytes_4bit"}
    mark_pruned(config)
    assert config.quantization_config == {"quant_method": "bitsandbytes_4bit"}
    assert getattr(config, MARKER_KEY) == checkpoint_marker("dense")


def test_mark_pruned_needs_a_plan():
    with pytest.raises(ValueError, match="prune the model first"):
        mark_pruned(tiny_model("llama"))


# -------------------------------------------------------------------------- verification with optimum_msp
def test_reload_verifies_and_a_tampered_weight_fails(pruned_folder, tmp_path, verify_calls):
    AutoModelForCausalLM.from_pretrained(pruned_folder)
    assert verify_calls == [1]
    folder = _copy(pruned_folder, tmp_path / "tampered")
    _tamper(folder)
    with pytest.raises(PlanError, match=TAMPERED_LAYER):
        AutoModelForCausalLM.from_pretrained(folder)


def test_legacy_marker_still_verifies_and_is_migrated_on_save(pruned_folder, tmp_path, verify_calls):
    folder = _copy(pruned_folder, tmp_path / "legacy")
    _as_legacy(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert verify_calls == [1]
    model.save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert "quantization_config" not in saved and saved[MARKER_KEY] == checkpoint_marker("dense")
    AutoModelForCausalLM.from_pretrained(tmp_path / "resaved")  # the new form verifies too
    assert verify_calls == [1, 1]

    _tamper(folder)
    with pytest.raises(PlanError, match=TAMPERED_LAYER):
        AutoModelForCausalLM.from_pretrained(folder)


def test_legacy_compact_checkpoint_still_loads(pruned_folder, tmp_path, verify_calls):
    """A compact checkpoint from before the top-level marker: only its ``quantization_config``."""
    model = AutoModelForCausalLM.from_pretrained(pruned_folder)
    save_compact(model, tmp_path / "compact")
    _edit_config(tmp_path / "compact", lambda config: config.pop(MARKER_KEY))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compact")
    assert verify_calls == [1, 1]
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key


# ------------------------------------------------------------------------------------------------ lm-eval
def _hflm(folder: Path):
    huggingface = pytest.importorskip("lm_eval.models.huggingface", reason="lm-eval is not installed (optional)")
    return huggingface.HFLM(pretrained=str(folder), device="cpu", batch_size=1)


def test_lm_eval_loads_and_verifies_with_optimum_msp_imported(pruned_folder, tmp_path, verify_calls):
    lm = _hflm(pruned_folder)
    assert verify_calls == [1]  # lm-eval's from_pretrained goes through the load hook
    assert getattr(lm.model.config, "quantization_config", None) is None
    folder = _copy(pruned_folder, tmp_path / "tampered")
    _tamper(folder)
    with pytest.raises(PlanError, match=TAMPERED_LAYER):
        _hflm(folder)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")  # lm-eval passes it back
@pytest.mark.parametrize("kind", ["legacy", "compact"])
def test_lm_eval_loads_msp_quantization_configs_with_optimum_msp_imported(kind, pruned_folder, tmp_path,
                                                                          verify_calls):
    """Checkpoints that keep an msp ``quantization_config`` load in lm-eval once ``optimum_msp`` is imported
    (lm-eval resolves the entry through transformers' registry, where the import put ``"msp"``)."""
    expected = AutoModelForCausalLM.from_pretrained(pruned_folder).state_dict()
    if kind == "legacy":
        folder = _copy(pruned_folder, tmp_path / "legacy")
        _as_legacy(folder)
    else:
        folder = _copy(pruned_folder, tmp_path / "tokenizer-only")
        (folder / "model.safetensors").unlink()
        save_compact(AutoModelForCausalLM.from_pretrained(pruned_folder), folder)
    before = len(verify_calls)
    lm = _hflm(folder)
    assert len(verify_calls) == before + 1
    for key, value in lm.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


# ---------------------------------------------------------------------------- the same without optimum_msp
STOCK_TOOLS = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.simplefilter("always")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    folder, reference, legacy, compact = sys.argv[1:5]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = AutoConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
    assert not caught, [str(w.message) for w in caught]
    # vLLM's config parsing reads hf_config.quantization_config and refuses methods it does not know
    assert getattr(config, "quantization_config", None) is None
    assert getattr(config.get_text_config(), "quantization_config", None) is None
    ids = torch.load(reference)["ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, torch.load(reference)["logits"]), "transformers: logits differ"
    print("TRANSFORMERS-DONE", file=sys.stderr, flush=True)
    print("TRANSFORMERS-OK")
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        print("NO-LM-EVAL")
    else:
        lm = HFLM(pretrained=folder, device="cpu", batch_size=1)
        with torch.no_grad():
            assert torch.equal(lm.model(ids).logits, torch.load(reference)["logits"]), "lm-eval: logits differ"
        print("LM-EVAL-OK")
        # what the top-level marker avoids: lm-eval refuses an msp quantization_config it cannot resolve
        for kind, other in (("legacy", legacy), ("compact", compact)):
            try:
                HFLM(pretrained=other, device="cpu", batch_size=1)
            except ValueError as error:
                assert "Unknown quantization type, got msp" in str(error), error
                print(f"LM-EVAL-REFUSES-{kind}")
    assert "optimum_msp" not in sys.modules
    """
)


def test_dense_checkpoint_loads_in_stock_tools_without_optimum_msp(pruned_folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(pruned_folder)
    ids = calibration_ids(samples=2, seqlen=16, seed=5)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "reference.pt")
    legacy = _copy(pruned_folder, tmp_path / "legacy")
    _as_legacy(legacy)
    compact = _copy(pruned_folder, tmp_path / "compact")
    (compact / "model.safetensors").unlink()
    save_compact(model, compact)
    result = run_without_optimum_msp(STOCK_TOOLS, pruned_folder, tmp_path / "reference.pt", legacy, compact,
                                     tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TRANSFORMERS-OK" in result.stdout
    transformers_part = result.stderr.split("TRANSFORMERS-DONE")[0].lower()
    assert "warn" not in transformers_part and "quantization" not in transformers_part, transformers_part[-2000:]
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        assert "NO-LM-EVAL" in result.stdout
    else:
        for line in ("LM-EVAL-OK", "LM-EVAL-REFUSES-legacy", "LM-EVAL-REFUSES-compact"):
            assert line in result.stdout, result.stderr[-3000:]

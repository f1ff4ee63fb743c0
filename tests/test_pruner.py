"""End-to-end pruning over a matrix of tiny architectures (a shared tester class, as peft does)."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from optimum_msp import MSPConfig, MSPPruner, SparsityPlan
from optimum_msp.modeling.blocks import prunable_layers, weight_matrix
from tiny_models import ARCHITECTURES, CORE_ARCHITECTURES, calibration_ids, tiny_model

CASES = [
    ("magnitude", dict(sparsity=0.5)),
    ("wanda", dict(sparsity=0.6)),
    ("wanda", dict(pattern="2:4")),
    ("sparsegpt", dict(sparsity=0.5)),
    ("sparsegpt", dict(pattern="4:8")),
]


def _prune(arch, method, **kwargs):
    model = tiny_model(arch)
    pruner = MSPPruner(model)
    pruner.prune(MSPConfig(method=method, **kwargs), calibration=calibration_ids())
    return pruner


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method, kwargs", CASES, ids=[f"{m}-{k.get('pattern', k.get('sparsity'))}" for m, k in CASES])
def test_prune_meets_plan(arch, method, kwargs):
    pruner = _prune(arch, method, **kwargs)
    plan = SparsityPlan.from_config(pruner.model.config)
    report = plan.verify(pruner.model)
    assert report.nm_compliant
    config = MSPConfig(method=method, **kwargs).resolved()
    assert report.global_sparsity == pytest.approx(config.sparsity, abs=0.01)
    assert plan.achieved_sparsity == pytest.approx(report.global_sparsity)
    if config.nm:
        n, m = config.nm
        for name, layer in report.layers.items():
            assert layer.nm_violations == 0
    else:  # every layer holds its nearest count; Wanda/magnitude spread it over the rows, at most one apart
        for block in prunable_layers(pruner.model):
            for name, module in block.items():
                weight = weight_matrix(module)
                assert int((weight == 0).sum()) == round(plan.layers[name].target.sparsity * weight.numel()), name
                if method != "sparsegpt":
                    rows = (weight == 0).sum(dim=1)
                    assert int(rows.max() - rows.min()) <= 1, name


@pytest.mark.parametrize("arch", CORE_ARCHITECTURES)
def test_only_targeted_layers_are_touched(arch):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = ["re:.*mlp.*"]
    MSPPruner(model).prune(MSPConfig(method="sparsegpt", sparsity=0.5, targets=targets), calibration=calibration_ids())
    chosen = {n for block in prunable_layers(model, targets=targets) for n in block}
    assert chosen
    for key, value in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in chosen and key.endswith("weight"):
            assert not torch.equal(value, before[key]), key
        else:
            assert torch.equal(value, before[key]), f"{key} changed but was not targeted"


@pytest.mark.parametrize("arch", CORE_ARCHITECTURES)
def test_saved_folder_reloads_with_stock_transformers(arch, tmp_path):
    pruner = _prune(arch, "wanda", pattern="2:4")
    out = pruner.save_pretrained(tmp_path / "pruned")
    assert {"config.json", "model.safetensors", "msp_config.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["sparsity_plan"]["pattern"] == "n:m"
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    original = pruner.model.state_dict()
    assert all(torch.equal(value, original[key]) for key, value in reloaded.state_dict().items())
    ids = calibration_ids(samples=2, seqlen=16, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruner.model(ids).logits, rtol=0, atol=0)
    SparsityPlan.from_config(reloaded.config).verify(reloaded)
    assert MSPConfig.from_pretrained(out) == pruner.config


def test_save_is_atomic(tmp_path, monkeypatch):
    pruner = _prune("llama", "magnitude", sparsity=0.5)
    target = tmp_path / "out"
    pruner.save_pretrained(target)
    first = sorted(p.name for p in target.iterdir())

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pruner.model, "save_pretrained", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        pruner.save_pretrained(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == first  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind


def test_save_never_deletes_what_it_did_not_write(tmp_path):
    from optimum_msp.utils.io import OutputExistsError

    pruner = _prune("llama", "magnitude", sparsity=0.5)
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # a folder that is not a checkpoint of ours is refused either way
        with pytest.raises(OutputExistsError, match=str(tmp_path)):
            pruner.save_pretrained(tmp_path, overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"
    out = tmp_path / "out"
    pruner.save_pretrained(out)
    with pytest.raises(OutputExistsError, match="overwrite"):
        pruner.save_pretrained(out)
    pruner.save_pretrained(out, overwrite=True)  # a previous checkpoint may be replaced when asked
    assert SparsityPlan.from_config(AutoConfig.from_pretrained(out)) is not None


def test_run_report_is_beside_the_checkpoint_not_in_its_config(tmp_path):
    pruner = _prune("llama", "wanda", sparsity=0.5)
    assert pruner.report["prune_seconds"] > 0 and pruner.report["peak_rss_mb"] > 0
    pruner.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == pruner.report
    plan = json.loads((tmp_path / "out" / "config.json").read_text())["sparsity_plan"]
    assert "seconds" not in json.dumps(plan) and "memory" not in json.dumps(plan)


def test_the_config_seed_draws_the_calibration_and_the_search(tmp_path):
    """No calibration given: the config's seed alone decides the windows, the held-out windows and the search."""
    from tiny_models import CharTokenizer

    corpus = tmp_path / "corpus.txt"
    generator = torch.Generator().manual_seed(0)
    corpus.write_text("".join(chr(97 + int(c)) for c in torch.randint(0, 26, (4_000,), generator=generator)))

    def run(seed):
        pruner = MSPPruner(tiny_model("llama"), CharTokenizer())
        pruner.prune(MSPConfig(method="wanda", sparsity=0.6, allocation="msp", calibration_dataset=str(corpus),
                               num_calibration_samples=4, seqlen=32, fisher_samples=2, fitness_samples=2,
                               fitness_seqlen=32, population_size=4, generations=2, seed=seed))
        return pruner.model.state_dict(), pruner.plan

    (first, plan), (again, plan_again), (other, plan_other) = run(0), run(0), run(1)
    assert all(torch.equal(first[k], again[k]) for k in first) and plan.to_dict() == plan_again.to_dict()
    assert plan.calibration["seed"] == 0 and plan_other.calibration["seed"] == 1
    assert plan.calibration["split"] == "train"  # the split read (a local file has one), not None for "default"
    assert not all(torch.equal(first[k], other[k]) for k in first)  # another seed, other windows


def test_same_seed_same_weights():
    a = _prune("llama", "sparsegpt", sparsity=0.5).model.state_dict()
    b = _prune("llama", "sparsegpt", sparsity=0.5).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_targets_selecting_nothing_is_an_error():
    with pytest.raises(ValueError, match="select no linear layer"):
        _prune("llama", "magnitude", sparsity=0.5, targets=["re:nothing"])


def test_calibration_needs_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        MSPPruner(tiny_model("llama")).prune(MSPConfig(method="wanda"))

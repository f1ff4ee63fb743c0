"""report.md and what it is built from: the comparison allocations recorded at prune time, the folder's plan read
back in block order, the results recorded in the card and the run report."""

import json

import pytest

from optimum_msp import MSPConfig, MSPPruner
from optimum_msp.report import natural_key, read_plan, recorded_results, render_report
from tiny_models import calibration_ids, tiny_model


def _saved(tmp_path, config, compare_with=("uniform", "owl"), name="out"):
    pruner = MSPPruner(tiny_model("llama"))
    calibration = calibration_ids() if config.needs_calibration else None
    pruner.prune(config, calibration=calibration, compare_with=compare_with)
    pruner.save_pretrained(tmp_path / name, plot=False)
    return pruner, tmp_path / name


def test_comparison_holds_what_owl_and_uniform_give_the_same_layers(tmp_path):
    pruner, folder = _saved(tmp_path, MSPConfig(method="wanda", sparsity=0.6, allocation="fisher"))
    comparison = pruner.report["comparison"]
    assert set(comparison) == {"uniform", "owl"}
    # OWL as its own run would plan it, on the same (dense) model and calibration
    owl = MSPPruner(tiny_model("llama"))
    owl.prune(MSPConfig(method="wanda", sparsity=0.6, allocation="owl"), calibration=calibration_ids())
    assert comparison["owl"] == {name: layer.target.sparsity for name, layer in owl.plan.layers.items()}
    assert set(comparison["uniform"].values()) == {0.6}
    # the plan itself is the run's own (the comparison did not change the weights it pruned)
    plain = MSPPruner(tiny_model("llama"))
    plain.prune(MSPConfig(method="wanda", sparsity=0.6, allocation="fisher"), calibration=calibration_ids())
    assert plain.plan.to_dict() == pruner.plan.to_dict()
    text = (folder / "report.md").read_text()
    assert "| block | layers | weights | fisher | uniform | owl | Fisher trace |" in text
    assert json.loads((folder / "report.json").read_text())["comparison"] == comparison


def test_comparison_skips_what_cannot_apply(tmp_path):
    # data-free run: OWL needs calibration, uniform does not; the run's own allocation is never compared
    pruner = MSPPruner(tiny_model("llama"))
    pruner.prune(MSPConfig(method="magnitude", sparsity=0.5), compare_with=("uniform", "owl"))
    assert "comparison" not in pruner.report
    pruner = MSPPruner(tiny_model("llama"))
    pruner.prune(MSPConfig(method="magnitude", sparsity=0.5, allocation="fisher"), calibration=calibration_ids(),
                 compare_with=("uniform", "owl", "fisher"))
    assert set(pruner.report["comparison"]) == {"uniform", "owl"}
    # a fixed N:M pattern leaves nothing to allocate
    pruner = MSPPruner(tiny_model("llama"))
    pruner.prune(MSPConfig(method="wanda", pattern="2:4"), calibration=calibration_ids(), compare_with=("owl",))
    assert "comparison" not in pruner.report
    with pytest.raises(ValueError, match="Unknown allocation 'owls'"):
        MSPPruner(tiny_model("llama")).prune(MSPConfig(method="wanda", sparsity=0.5), calibration=calibration_ids(),
                                             compare_with=("owls",))


def test_plan_is_read_back_in_block_order(tmp_path):
    assert sorted(["model.layers.10.a", "model.layers.2.b", "model.layers.2.a"], key=natural_key) == [
        "model.layers.2.a", "model.layers.2.b", "model.layers.10.a"]
    pruner = MSPPruner(tiny_model("llama", num_hidden_layers=11))
    pruner.prune(MSPConfig(method="magnitude", sparsity=0.5))
    pruner.save_pretrained(tmp_path / "out", plot=False)
    blocks = [name.split(".")[2] for name in read_plan(tmp_path / "out").layers]
    assert blocks == sorted(blocks, key=int)  # config.json holds them sorted as text: 0, 1, 10, 2, ...
    text = render_report(tmp_path / "out")
    assert text.index("| model.layers.2 |") < text.index("| model.layers.10 |")


def test_read_plan_says_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        read_plan(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        read_plan(tmp_path / "plain")
    (tmp_path / "plain" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="holds no sparsity plan"):
        read_plan(tmp_path / "plain")


def test_results_come_from_the_card_and_the_run_report_once_each(tmp_path):
    from optimum_msp.integrations.model_card import perplexity_result

    pruner = MSPPruner(tiny_model("llama"))
    pruner.prune(MSPConfig(method="magnitude", sparsity=0.5))
    pruner.report["evaluation"] = {"wikitext2_test_ppl": 40.0, "windows": "all", "seqlen": 2048, "bos": False}
    pruner.save_pretrained(tmp_path / "whole", results=[perplexity_result(40.0, bos=False)], plot=False)
    assert [(r["value"], r["source"]) for r in recorded_results(tmp_path / "whole")] == [(40.0, "model card")]
    pruner.report["evaluation"] = {"wikitext2_test_ppl": 45.0, "windows": 16, "seqlen": 2048, "bos": False}
    pruner.save_pretrained(tmp_path / "partial", plot=False)
    rows = recorded_results(tmp_path / "partial")
    assert [(r["value"], r["note"]) for r in rows] == [(45.0, "first 16 windows of 2048 tokens, no BOS")]
    assert "| WikiText-2 (raw) | test | perplexity | 45 | first 16 windows" in render_report(tmp_path / "partial")


def test_update_card_replaces_the_same_measurement_and_keeps_the_others(tmp_path):
    from huggingface_hub import ModelCard

    from optimum_msp.commands.evaluate import update_card
    from optimum_msp.integrations.model_card import perplexity_result

    pruner = MSPPruner(tiny_model("llama"))
    pruner.prune(MSPConfig(method="magnitude", sparsity=0.5))
    folder = pruner.save_pretrained(tmp_path / "out", results=[perplexity_result(50.0, seqlen=2048)], plot=False)
    before = (folder / "report.md").read_text()
    update_card(folder, [perplexity_result(42.0, seqlen=2048), perplexity_result(60.0, seqlen=512)])
    results = ModelCard.load(folder / "README.md").data.eval_results
    assert sorted((r.metric_name, r.metric_value) for r in results) == [
        ("Perplexity (seqlen 2048)", 42.0), ("Perplexity (seqlen 512)", 60.0)]
    after = (folder / "report.md").read_text()
    assert "| 42 |" in after and "| 60 |" in after and "| 50 |" in before and "| 50 |" not in after
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]  # nothing left half-written


def test_the_search_section_says_what_a_pool_search_measured(tmp_path):
    config = dict(method="wanda", sparsity=0.6, allocation="msp", population_size=4, generations=2,
                  fisher_samples=2, fitness_samples=2, fitness_seqlen=16)
    texts = {}
    for pool in (0, 4):
        pruner = MSPPruner(tiny_model("llama"))
        pruner.prune(MSPConfig(**config, fitness_pool=pool), calibration=calibration_ids(),
                     fitness_ids=calibration_ids(pool or 2, 16, seed=7))
        pruner.save_pretrained(tmp_path / f"pool{pool}", plot=False)
        text = render_report(tmp_path / f"pool{pool}")
        texts[pool] = text[text.index("## Search"):].split("\n## ")[0]
    assert "| uniform_fitness |" in texts[0] and "fitness_pool" not in texts[0]
    assert "| fitness_pool | 4 |" in texts[4] and "| uniform_fitness |" not in texts[4]
    assert "on all 4 pool windows" in texts[4]

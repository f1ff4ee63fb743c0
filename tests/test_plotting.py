import logging

import pytest

from optimum_msp import MSPConfig, MSPPruner, SparsityPlan
from optimum_msp import plotting
from tiny_models import calibration_ids, tiny_model

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _pruner(arch="llama"):
    pruner = MSPPruner(tiny_model(arch))
    pruner.prune(MSPConfig(method="wanda", sparsity=0.5, allocation="owl"), calibration=calibration_ids())
    return pruner


def test_layer_series_groups_layers_by_block():
    plan = SparsityPlan.from_config(_pruner().model.config)
    owners, kinds, sparsities = plotting.layer_series(plan)
    assert owners[0] == "model.layers.0" and owners[-1] == "model.layers.2"
    assert kinds.count("self_attn.q_proj") == 3 and kinds.count("mlp.down_proj") == 3
    assert sparsities == [layer.target.sparsity for layer in plan.layers.values()]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_plot_plan_writes_png_with_search_curve(arch, tmp_path):
    plan = SparsityPlan.from_config(_pruner(arch).model.config)
    plan.search = {"history": [3.0, 2.5, 2.4], "uniform_fitness": 4.0, "fisher_fitness": 3.1, "fitness": "kl"}
    plan.block_sensitivity = {"0": 10.0, "1": 100.0}
    path = plotting.plot_plan(plan, tmp_path / "plan.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_save_pretrained_links_the_figure_from_the_card(tmp_path):
    pruner = _pruner()
    pruner.save_pretrained(tmp_path / "with")
    assert (tmp_path / "with" / plotting.PLOT_FILENAME).read_bytes()[:8] == PNG_MAGIC
    assert f"]({plotting.PLOT_FILENAME})" in (tmp_path / "with" / "README.md").read_text()
    pruner.save_pretrained(tmp_path / "without", plot=False)
    assert not (tmp_path / "without" / plotting.PLOT_FILENAME).exists()
    assert plotting.PLOT_FILENAME not in (tmp_path / "without" / "README.md").read_text()


def test_a_failing_figure_never_fails_the_save(tmp_path, monkeypatch, caplog):
    pruner = _pruner()

    def broken(plan, path, **kwargs):
        raise ValueError("odd search data")

    monkeypatch.setattr(plotting, "plot_plan", broken)
    with caplog.at_level(logging.WARNING, logger="optimum_msp"):
        pruner.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()
    assert not (tmp_path / "out" / plotting.PLOT_FILENAME).exists()
    assert "odd search data" in caplog.text


def test_fitness_is_labelled_with_what_it_is():
    from optimum_msp.plotting import fitness_label

    assert "NLL" in fitness_label("ppl") and "ppl" not in fitness_label("ppl")
    assert "KL" in fitness_label("kl")


def test_comparison_series_stands_beside_the_plan():
    plan = SparsityPlan.from_config(_pruner().model.config)  # an OWL plan
    layers = list(plan.layers)
    recorded = {"owl": {name: 0.1 for name in layers}, "fisher": {name: 0.2 for name in layers},
                "partial": {layers[0]: 0.3}}
    series = plotting.comparison_series(plan, recorded)
    # the plan's own allocation is its bars; a comparison missing layers says nothing; uniform = the target
    assert list(series) == ["uniform", "fisher"]
    assert series["uniform"] == [0.5] * len(layers) and series["fisher"] == [0.2] * len(layers)
    recorded["uniform"] = {name: 0.4 for name in layers}  # a recorded uniform plan (e.g. mixed N:M) wins
    assert plotting.comparison_series(plan, recorded)["uniform"] == [0.4] * len(layers)


def test_plot_plan_draws_comparisons_and_mean_fitness(tmp_path):
    plan = SparsityPlan.from_config(_pruner().model.config)
    plan.search = {"history": [3.0, 2.5], "mean_history": [3.5, 3.0], "uniform_fitness": 4.0, "fitness": "ppl"}
    plan.block_sensitivity = {"0": 10.0, "1": 100.0, "2": 50.0}
    path = plotting.plot_plan(plan, tmp_path / "plan.png", comparison={"uniform": {n: 0.5 for n in plan.layers}})
    assert path.read_bytes()[:8] == PNG_MAGIC
    traces = {name: float(i + 1) for i, name in enumerate(plan.layers)}
    assert plotting.plot_sensitivity(traces, {"0": 1.0, "1": 2.0}, tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC

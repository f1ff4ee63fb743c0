from huggingface_hub import ModelCard

from optimum_msp import MSPConfig, MSPPruner, SparsityPlan
from optimum_msp.integrations.model_card import build_model_card, perplexity_result
from tiny_models import calibration_ids, tiny_model


def _plan():
    model = tiny_model("llama")
    MSPPruner(model).prune(MSPConfig(method="wanda", pattern="2:4"), calibration=calibration_ids())
    return SparsityPlan.from_config(model.config)


def test_card_parses_and_holds_results(tmp_path):
    plan = _plan()
    zero_shot = {"task_type": "text-generation", "dataset_type": "allenai/ai2_arc", "dataset_name": "ARC-Easy",
                 "dataset_config": "ARC-Easy", "dataset_split": "test", "metric_type": "acc", "metric_value": 0.4321}
    card = build_model_card(plan, "HuggingFaceTB/SmolLM2-135M-Instruct", [perplexity_result(31.25), zero_shot])
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in loaded.data.eval_results}
    assert results == {("WikiText-2 (raw)", "perplexity"): 31.25, ("ARC-Easy", "acc"): 0.4321}
    assert loaded.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    text = loaded.text
    assert "wanda" in text and "uniform" in text and "0.5000" in text
    for name in plan.layers:
        assert name in text  # the per-layer table lists every layer
    assert "model-index" in (tmp_path / "README.md").read_text()


def test_card_without_results_has_no_model_index(tmp_path):
    card = build_model_card(_plan())
    card.save(tmp_path / "README.md")
    assert "model-index" not in (tmp_path / "README.md").read_text()
    assert ModelCard.load(tmp_path / "README.md").data.eval_results is None

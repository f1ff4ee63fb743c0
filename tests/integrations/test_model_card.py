import logging

import yaml
from huggingface_hub import EvalResult, ModelCard, parse_eval_result_entries

from optimum_msp import MSPConfig, MSPPruner, SparsityPlan
from optimum_msp.integrations.model_card import (
    HUB_BENCHMARKS, HubBenchmark, build_model_card, eval_result_entries, perplexity_result, write_eval_results,
)
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


# ----------------------------------------------------------------------- whole splits only; Hub eval results
def _gpqa(metric="acc", value=0.3131, **args):
    return EvalResult(task_type="text-generation", task_name="gpqa_diamond_zeroshot", dataset_type="Idavidrein/gpqa",
                      dataset_name="gpqa_diamond_zeroshot", dataset_config="gpqa_diamond", dataset_split="train",
                      dataset_args={"num_few_shot": 0, **args}, metric_type=metric, metric_value=value)


def _arc(**args):
    return EvalResult(task_type="text-generation", dataset_type="allenai/ai2_arc", dataset_name="ARC-Easy",
                      dataset_config="ARC-Easy", dataset_split="test", dataset_args=args or None, metric_type="acc",
                      metric_value=0.5)


def test_partial_split_results_stay_out_of_the_card(tmp_path, caplog):
    partial_ppl = perplexity_result(28.0)
    partial_ppl.dataset_args = {"max_windows": 16}
    results = [perplexity_result(31.25), partial_ppl, _arc(limit=100), _arc(), _gpqa(limit=50)]
    with caplog.at_level(logging.WARNING, logger="optimum_msp"):
        card = build_model_card(_plan(), "base/model", results)
    card.save(tmp_path / "README.md")
    kept = [(r.dataset_name, r.metric_value) for r in ModelCard.load(tmp_path / "README.md").data.eval_results]
    assert kept == [("WikiText-2 (raw)", 31.25), ("ARC-Easy", 0.5)]
    assert caplog.text.count("measured on part of the split") == 3 and "limit=100" in caplog.text
    assert "28" not in card.text.split("## Results")[1].split("##")[0]  # nor in the results table


def test_registered_benchmarks_get_eval_results_files(tmp_path):
    results = [_gpqa(), _gpqa(metric="acc_norm", value=0.4), _gpqa(value=0.9, limit=20), _arc(), perplexity_result(9.0)]
    written = write_eval_results(tmp_path, results)
    assert written == [tmp_path / ".eval_results" / "gpqa_diamond.yaml"]
    entries = parse_eval_result_entries(yaml.safe_load(written[0].read_text()))
    assert [(e.dataset_id, e.task_id, e.value) for e in entries] == [("Idavidrein/gpqa", "gpqa_diamond", 0.3131)]
    assert "num_few_shot=0" in entries[0].notes
    assert write_eval_results(tmp_path / "none", [_arc(), perplexity_result(9.0)]) == []
    assert not (tmp_path / "none").exists()


def test_another_registered_benchmark_can_be_named(tmp_path):
    mine = HubBenchmark(dataset_id="allenai/ai2_arc", task_id="arc_easy", metric="acc", dataset_config="ARC-Easy")
    files = eval_result_entries([_arc(), _gpqa()], benchmarks=[mine])
    assert list(files) == ["arc_easy.yaml"] and files["arc_easy.yaml"][0].value == 0.5
    assert mine not in HUB_BENCHMARKS


def test_pruner_save_writes_card_and_eval_results(tmp_path):
    from optimum_msp.evaluation.lm_eval import LmEvalRun

    run = LmEvalRun.from_results({
        "results": {"gpqa_diamond_zeroshot": {"acc,none": 0.2828, "acc_stderr,none": 0.032}},
        "configs": {"gpqa_diamond_zeroshot": {"dataset_path": "Idavidrein/gpqa", "dataset_name": "gpqa_diamond",
                                              "validation_split": "train"}},
        "n-samples": {"gpqa_diamond_zeroshot": {"original": 198, "effective": 198}},
        "n-shot": {"gpqa_diamond_zeroshot": 0}, "lm_eval_version": "0.4.13",
    })
    pruner = MSPPruner(tiny_model("llama"))
    pruner.prune(MSPConfig(method="magnitude", sparsity=0.5))
    folder = pruner.save_pretrained(tmp_path / "out", plot=False,
                                    results=(r for r in [perplexity_result(40.0), *run.to_eval_results()]))
    card = ModelCard.load(folder / "README.md")
    assert {r.metric_type for r in card.data.eval_results} == {"perplexity", "acc"}
    entries = parse_eval_result_entries(yaml.safe_load((folder / ".eval_results" / "gpqa_diamond.yaml").read_text()))
    assert [(e.task_id, e.value) for e in entries] == [("gpqa_diamond", 0.2828)]

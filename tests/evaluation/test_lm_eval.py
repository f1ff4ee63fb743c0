"""lm-eval as an evaluation backend: a local YAML task (json files written here, nothing downloads) run on a tiny
model in memory, checked against log-likelihoods computed from the model directly."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimum_msp.evaluation.lm_eval import LmEvalRun, evaluate_lm_eval, run_lm_eval
from tiny_models import tiny_model, word_tokenizer

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'optimum-msp[lm-eval]')")

TASK = "tiny_choice"
TASK_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _documents(count: int = 6, seed: int = 0):
    rng = random.Random(seed)
    words = lambda n: " ".join(f"w{rng.randrange(60)}" for _ in range(n))  # noqa: E731
    return [{"question": words(5), "choices": [words(rng.randrange(1, 4)) for _ in range(3)],
             "label": rng.randrange(3)} for _ in range(count)]


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm_eval_task")
    (folder / "test.jsonl").write_text("\n".join(json.dumps(doc) for doc in _documents()) + "\n")
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(data=folder / "test.jsonl"))
    return folder


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_model("llama"), word_tokenizer(adds_bos=False)


def _expected(model, tokenizer, documents):
    """acc and acc_norm from the model's own log-likelihoods: each choice (after a space) scored after the
    question, acc_norm dividing by the choice's length in characters (lm-eval's definitions)."""
    correct = correct_norm = 0
    for doc in documents:
        context = tokenizer(doc["question"]).input_ids
        scores = []
        for choice in doc["choices"]:
            continuation = tokenizer(" " + choice).input_ids
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            positions = range(len(context), len(context) + len(continuation))
            scores.append(sum(logprobs[p - 1, ids[0, p]].item() for p in positions))
        correct += max(range(3), key=lambda i: scores[i]) == doc["label"]
        correct_norm += max(range(3), key=lambda i: scores[i] / len(doc["choices"][i])) == doc["label"]
    return {"acc": correct / len(documents), "acc_norm": correct_norm / len(documents)}


def test_local_task_scores_the_model_in_memory(task_folder, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.train()  # the caller's mode comes back
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    run = run_lm_eval(model, tokenizer, [TASK], batch_size=4, include_path=task_folder, include_defaults=False)
    assert torch.equal(torch.rand(3), expected_draw)  # lm-eval's seeding did not leak into the caller's generator
    assert model.training

    expected = _expected(model.eval(), tokenizer, _documents())
    metrics = run.metrics[TASK]
    assert metrics["acc"] == pytest.approx(expected["acc"])
    assert metrics["acc_norm"] == pytest.approx(expected["acc_norm"])
    assert metrics["acc_stderr"] > 0 and set(metrics) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert run.samples[TASK] == (6, 6) and run.whole_split(TASK)
    assert run.tasks[TASK]["split"] == "test" and run.tasks[TASK]["num_fewshot"] == 0
    assert run.to_eval_results() == []  # a local json task names no Hub dataset


def test_limit_scores_the_first_documents_and_stays_out_of_the_card(task_folder, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    run = run_lm_eval(model, tokenizer, [TASK], limit=2, batch_size=4, include_path=task_folder,
                      include_defaults=False)
    assert run.samples[TASK] == (2, 6) and not run.whole_split(TASK)
    assert run.metrics[TASK]["acc"] == pytest.approx(_expected(model, tokenizer, _documents()[:2])["acc"])
    run.tasks[TASK]["path"] = "Idavidrein/gpqa"  # even a Hub dataset: a partial number never reaches a card
    assert run.to_eval_results() == []


def test_evaluate_lm_eval_returns_task_metric_values(task_folder, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    results = evaluate_lm_eval(model, tokenizer, [TASK], limit=3, batch_size=2, include_path=task_folder,
                               include_defaults=False)
    assert list(results) == [TASK] and isinstance(results[TASK]["acc"], float)
    assert results[TASK]["acc"] == pytest.approx(_expected(model, tokenizer, _documents()[:3])["acc"])


def test_whole_split_hub_results_become_model_index_entries():
    """The card entries of a whole-split run: one per metric, stderr left out, dataset as the task names it."""
    run = LmEvalRun.from_results({
        "results": {"gpqa_diamond_zeroshot": {"alias": "gpqa", "acc,none": 0.25, "acc_stderr,none": 0.03,
                                              "acc_norm,none": 0.3, "acc_norm_stderr,none": "N/A"}},
        "configs": {"gpqa_diamond_zeroshot": {"dataset_path": "Idavidrein/gpqa", "dataset_name": "gpqa_diamond",
                                              "validation_split": "train", "num_fewshot": 0}},
        "n-samples": {"gpqa_diamond_zeroshot": {"original": 198, "effective": 198}},
        "n-shot": {"gpqa_diamond_zeroshot": 0}, "lm_eval_version": "0.4.13",
    })
    entries = run.to_eval_results()
    assert [(e.metric_type, e.metric_value) for e in entries] == [("acc", 0.25), ("acc_norm", 0.3)]
    assert {(e.dataset_type, e.dataset_config, e.dataset_split) for e in entries} == {
        ("Idavidrein/gpqa", "gpqa_diamond", "train")}
    assert "acc_norm_stderr" not in run.metrics["gpqa_diamond_zeroshot"]  # "N/A" is not a number


def test_bad_arguments_are_explained(task_folder, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    options = dict(include_path=task_folder, include_defaults=False)
    with pytest.raises(ValueError, match=r"Unknown lm-eval task\(s\) \['no_such_task'\]"):
        evaluate_lm_eval(model, tokenizer, ["no_such_task"], **options)
    with pytest.raises(ValueError, match="non-empty list"):
        evaluate_lm_eval(model, tokenizer, TASK, **options)
    with pytest.raises(ValueError, match="limit"):
        evaluate_lm_eval(model, tokenizer, [TASK], limit=0, **options)
    with pytest.raises(FileNotFoundError, match="include_path"):
        evaluate_lm_eval(model, tokenizer, [TASK], include_path=task_folder / "missing", include_defaults=False)


def test_importing_optimum_msp_does_not_import_lm_eval():
    code = ("import sys, optimum_msp, optimum_msp.evaluation, optimum_msp.evaluation.lm_eval; "
            "assert 'lm_eval' not in sys.modules, 'lm_eval was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]

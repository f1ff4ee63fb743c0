"""The zero-shot tasks, each a transcription of its lm-evaluation-harness (v0.4.x) task config.

Sources: ``lm_eval/tasks/{arc/arc_easy.yaml, arc/arc_challenge.yaml, openbookqa/openbookqa.yaml,
super_glue/boolq/default.yaml, glue/rte/default.yaml, hellaswag/{hellaswag.yaml,utils.py},
winogrande/{default.yaml,preprocess_winogrande.py}, piqa/piqa.yaml, lambada/lambada_openai.yaml}``.
Jinja templates are written out as Python; ``target_delimiter`` is lm-eval's default ``" "``.
"""

from __future__ import annotations

from . import hellaswag
from .data import (
    load_arc_rows,
    load_boolq_rows,
    load_lambada_rows,
    load_openbookqa_rows,
    load_piqa_rows,
    load_rte_rows,
    load_winogrande_rows,
)
from .registry import LOGLIKELIHOOD, MULTIPLE_CHOICE, HubSource, LocalSource, ZeroShotTask, register_task

ACC_AND_NORM = ("acc", "acc_norm")


# ARC: doc_to_text "Question: {{question}}\nAnswer:", doc_to_choice "{{choices.text}}",
# doc_to_target "{{choices.label.index(answerKey)}}"
def _arc_task(name: str, config: str, subdir: str) -> ZeroShotTask:
    return ZeroShotTask(
        name=name,
        pretty_name=config,
        output_type=MULTIPLE_CHOICE,
        hub=(HubSource("allenai/ai2_arc", config, "test"), HubSource("ai2_arc", config, "test")),
        local=LocalSource(subdir, ("test.jsonl",), load_arc_rows),
        doc_to_text=lambda doc: f"Question: {doc['question']}\nAnswer:",
        doc_to_choice=lambda doc: list(doc["choices"]["text"]),
        doc_to_target=lambda doc: doc["choices"]["label"].index(doc["answerKey"]),
        metrics=ACC_AND_NORM,
    )


register_task(_arc_task("arc_easy", "ARC-Easy", "arc_easy"))
register_task(_arc_task("arc_challenge", "ARC-Challenge", "arc_challenge"))

# OpenBookQA: doc_to_text question_stem, doc_to_target "{{choices.label.index(answerKey.lstrip())}}"
register_task(
    ZeroShotTask(
        name="openbookqa",
        pretty_name="OpenBookQA",
        output_type=MULTIPLE_CHOICE,
        hub=(HubSource("allenai/openbookqa", "main", "test"), HubSource("openbookqa", "main", "test")),
        local=LocalSource("openbookqa", ("test.jsonl",), load_openbookqa_rows),
        doc_to_text=lambda doc: doc["question_stem"],
        doc_to_choice=lambda doc: list(doc["choices"]["text"]),
        doc_to_target=lambda doc: doc["choices"]["label"].index(doc["answerKey"].lstrip()),
        metrics=ACC_AND_NORM,
    )
)

# BoolQ (SuperGLUE): "{{passage}}\nQuestion: {{question}}?\nAnswer:", choices ["no", "yes"], target label
register_task(
    ZeroShotTask(
        name="boolq",
        pretty_name="BoolQ",
        output_type=MULTIPLE_CHOICE,
        hub=(HubSource("aps/super_glue", "boolq", "validation"), HubSource("super_glue", "boolq", "validation")),
        local=LocalSource("boolq", ("superglue_val.jsonl",), load_boolq_rows),
        doc_to_text=lambda doc: f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
        doc_to_choice=lambda doc: ["no", "yes"],
        doc_to_target=lambda doc: int(doc["label"]),
    )
)

# RTE (GLUE): "{{sentence1}}\nQuestion: {{sentence2}} True or False?\nAnswer:", choices ["True", "False"]
register_task(
    ZeroShotTask(
        name="rte",
        pretty_name="RTE",
        output_type=MULTIPLE_CHOICE,
        hub=(HubSource("nyu-mll/glue", "rte", "validation"), HubSource("glue", "rte", "validation")),
        local=LocalSource("rte", ("validation.parquet",), load_rte_rows),
        doc_to_text=lambda doc: f"{doc['sentence1']}\nQuestion: {doc['sentence2']} True or False?\nAnswer:",
        doc_to_choice=lambda doc: ["True", "False"],
        doc_to_target=lambda doc: int(doc["label"]),  # 0 = entailment = "True"
    )
)

# HellaSwag: process_docs builds query / choices (see hellaswag.py), doc_to_target "{{label}}"
register_task(
    ZeroShotTask(
        name="hellaswag",
        pretty_name="HellaSwag",
        output_type=MULTIPLE_CHOICE,
        hub=(HubSource("Rowan/hellaswag", None, "validation"), HubSource("hellaswag", None, "validation")),
        local=LocalSource("hellaswag", ("hellaswag_val_full.txt",), hellaswag.load_hellaswag_rows),
        process_doc=hellaswag.process_doc,
        doc_to_text=lambda doc: doc["query"],
        doc_to_choice=lambda doc: doc["choices"],
        doc_to_target=lambda doc: int(doc["label"]),
        metrics=ACC_AND_NORM,
    )
)


# WinoGrande, partial scoring: each option fills the blank to form a *context*; the shared continuation
# is the rest of the sentence after "_" (stripped), scored after the target delimiter.
def _winogrande_contexts(doc):
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


register_task(
    ZeroShotTask(
        name="winogrande",
        pretty_name="WinoGrande",
        output_type=MULTIPLE_CHOICE,
        hub=(
            HubSource("allenai/winogrande", "winogrande_xl", "validation"),
            HubSource("winogrande", "winogrande_xl", "validation"),
        ),
        local=LocalSource("winogrande", ("dev.jsonl", "dev-labels.lst"), load_winogrande_rows),
        doc_to_text=lambda doc: {"1": 0, "2": 1}[doc["answer"]],
        doc_to_choice=_winogrande_contexts,
        doc_to_target=lambda doc: doc["sentence"][doc["sentence"].index("_") + 1 :].strip(),
        choices_are_contexts=True,
    )
)

# PIQA: "Question: {{goal}}\nAnswer:", choices [sol1, sol2], target label
register_task(
    ZeroShotTask(
        name="piqa",
        pretty_name="PIQA",
        output_type=MULTIPLE_CHOICE,
        hub=(HubSource("baber/piqa", None, "validation"), HubSource("ybisk/piqa", None, "validation")),
        local=LocalSource("piqa", ("valid.jsonl", "valid-labels.lst"), load_piqa_rows),
        doc_to_text=lambda doc: f"Question: {doc['goal']}\nAnswer:",
        doc_to_choice=lambda doc: [doc["sol1"], doc["sol2"]],
        doc_to_target=lambda doc: int(doc["label"]),
        metrics=ACC_AND_NORM,
    )
)

# LAMBADA (OpenAI): context = all words but the last (split on " "), target = " " + last word;
# acc = the target is the greedy continuation, perplexity = exp(-mean per-doc target loglikelihood).
register_task(
    ZeroShotTask(
        name="lambada_openai",
        pretty_name="LAMBADA (OpenAI)",
        output_type=LOGLIKELIHOOD,
        hub=(HubSource("EleutherAI/lambada_openai", "default", "test"),),
        local=LocalSource("lambada_openai", ("test.jsonl",), load_lambada_rows),
        doc_to_text=lambda doc: " ".join(doc["text"].split(" ")[:-1]),
        doc_to_target=lambda doc: " " + doc["text"].split(" ")[-1],
        metrics=("perplexity", "acc"),
    )
)

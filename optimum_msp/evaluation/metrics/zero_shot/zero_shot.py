"""Zero-shot accuracy of a causal LM on lm-evaluation-harness tasks (BoolQ, RTE, HellaSwag, WinoGrande,
ARC-Easy/Challenge, OpenBookQA, PIQA, LAMBADA), scored as lm-eval scores them.
Load offline with ``evaluate.load("<path to this folder>")``."""

import datasets
import evaluate

from optimum_msp.evaluation.zeroshot import evaluate_tasks, list_tasks
from optimum_msp.evaluation.zeroshot.scoring import DEFAULT_MAX_BATCH_TOKENS

_DESCRIPTION = """Zero-shot multiple-choice accuracy by log-likelihood, exactly as lm-evaluation-harness defines
each task (prompt, choices, target delimiter " ", `acc`, `acc_norm` = log-likelihood divided by the choice's
length in characters, LAMBADA's greedy-match `acc` and `perplexity`), with lm-eval's standard errors.
The choices of a question share one forward pass of their context (its key/value cache is reused),
which gives the same numbers as scoring every choice separately, faster. Data come from the local
folder (OPTIMUM_MSP_DATA_DIR / shared/data) when present, else from the Hub datasets lm-eval uses."""

_KWARGS_DESCRIPTION = f"""
Args:
    tasks (list of str): task names among {", ".join(list_tasks())}.
    model: a causal LM object, or a Hub id / local folder / bundled alias such as "smollm2-135m"
        (`model_id=` is accepted as well, like the perplexity module).
    tokenizer: the model's tokenizer (loaded from `model` when it is a name).
    limit (int or float, optional): lm-eval's --limit: the first N documents of each task (fraction if < 1).
    batch_size (int): sequences per forward pass, default 32.
    max_batch_tokens (int): cap on sequences x padded length per forward pass, default 4096.
    data_dir (str, optional): local data folder laid out like shared/data.
    share_context (bool): reuse the context's KV cache across choices (default True; same results).
Returns:
    a dict task -> {{"acc", "acc_stderr", ["acc_norm", "acc_norm_stderr"], ["perplexity", "perplexity_stderr"],
    "n", "seconds"}}.
Examples:
    >>> zero_shot = evaluate.load("optimum_msp/evaluation/metrics/zero_shot")
    >>> zero_shot.compute(tasks=["arc_easy", "piqa"], model="smollm2-135m", limit=100)["arc_easy"]["acc"]
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ZeroShot(evaluate.Measurement):
    def _info(self):
        return evaluate.MeasurementInfo(
            module_type="measurement",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"tasks": datasets.Value("string")}),
        )

    def _compute(self, tasks, model=None, tokenizer=None, model_id=None, limit=None, batch_size=32,
                 data_dir=None, share_context=True, show_progress=True,
                 max_batch_tokens=DEFAULT_MAX_BATCH_TOKENS):
        model = model if model is not None else model_id
        if model is None:
            raise ValueError("Pass model= (a model object, Hub id, folder or alias) and, for an object, tokenizer=.")
        results = evaluate_tasks(
            model, tokenizer, tasks=list(tasks), limit=limit, batch_size=batch_size, data_dir=data_dir,
            share_context=share_context, show_progress=show_progress, max_batch_tokens=max_batch_tokens,
        )
        return results.to_dict()["results"]

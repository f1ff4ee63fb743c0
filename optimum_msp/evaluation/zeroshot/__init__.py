"""Zero-shot evaluation scored exactly as lm-evaluation-harness scores it.

>>> from optimum_msp.evaluation import zeroshot
>>> results = zeroshot.evaluate_tasks(model, tokenizer, tasks=["arc_easy", "piqa"], limit=200)
>>> results["arc_easy"].acc_norm, results.to_model_index("my-pruned-model")

Tasks: ``arc_easy``, ``arc_challenge``, ``boolq``, ``hellaswag``, ``lambada_openai``, ``openbookqa``,
``piqa``, ``rte``, ``winogrande``. Data come from the local folder
(:func:`optimum_msp.utils.local_data_dir`) when it holds the task, else from the Hub datasets lm-eval uses.
"""

from . import tasks as _register_tasks  # noqa: F401  (fills the registry)
from .data import load_task_docs
from .evaluator import DEFAULT_TASKS, evaluate_tasks
from .registry import ZeroShotTask, get_task, list_tasks, register_task
from .results import TaskResult, ZeroShotResults, mean_stderr
from .scoring import LoglikelihoodScorer

__all__ = [
    "DEFAULT_TASKS",
    "LoglikelihoodScorer",
    "TaskResult",
    "ZeroShotResults",
    "ZeroShotTask",
    "evaluate_tasks",
    "get_task",
    "list_tasks",
    "load_task_docs",
    "mean_stderr",
    "register_task",
]

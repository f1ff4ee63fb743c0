"""lm-evaluation-harness as an evaluation backend, on the model in memory (``pip install "optimum-msp[lm-eval]"``).

:func:`evaluate_lm_eval` runs lm-eval's ``simple_evaluate`` on an ``HFLM`` wrapping the live model and tokenizer,
so a pruned model is scored as it is, without saving and reloading it; any lm-eval task (or a YAML task of one's
own, found through ``include_path``) works. lm-eval itself is imported only when this runs: ``import optimum_msp``
never imports it, and our own scorer (:mod:`optimum_msp.evaluation.zeroshot`) stays the default and the offline
path. lm-eval loads each task's dataset the way the task says (the Hub unless the task names local files).

:func:`run_lm_eval` returns the same numbers with what is needed to record them: the dataset and split of each
task, and whether every document was scored (only such results may go into a model card).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch

#: ``datasets`` builders that read local files: a task using one has no Hub dataset to name in a model card
LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "imagefolder"})

PathLike = Union[str, Path]


def _import_lm_eval():
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(
            f"The lm-eval backend needs lm-evaluation-harness ({error}). Install it with "
            "`pip install \"optimum-msp[lm-eval]\"`, or evaluate with optimum-msp's own scorer (the default)."
        ) from None
    return simple_evaluate, HFLM, TaskManager


@dataclasses.dataclass
class LmEvalRun:
    """What one lm-eval run measured.

    ``metrics``: task -> metric -> value (lm-eval's ``"acc,none"`` becomes ``"acc"``; other filters keep their
    suffix, e.g. ``"exact_match,strict-match"``; stderr entries are ``"acc_stderr"``). ``samples``: task ->
    (documents scored, documents in the split). ``tasks``: task -> its dataset (``path``, ``name``, ``split``),
    ``num_fewshot`` and ``version``. ``groups``: group -> its tasks.
    """

    metrics: Dict[str, Dict[str, float]]
    samples: Dict[str, tuple]
    tasks: Dict[str, Dict[str, Any]]
    groups: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
    limit: Optional[float] = None
    lm_eval_version: Optional[str] = None

    @classmethod
    def from_results(cls, results: Dict[str, Any]) -> "LmEvalRun":
        """From the dict ``lm_eval.simple_evaluate`` returns."""
        metrics = {task: _metrics(values) for task, values in results.get("results", {}).items()}
        samples = {task: (int(count["effective"]), int(count["original"]))
                   for task, count in results.get("n-samples", {}).items()}
        tasks = {}
        for task, config in results.get("configs", {}).items():
            tasks[task] = {
                "path": config.get("dataset_path"), "name": config.get("dataset_name"),
                "split": config.get("test_split") or config.get("validation_split"),
                "num_fewshot": results.get("n-shot", {}).get(task, config.get("num_fewshot")),
                "version": results.get("versions", {}).get(task),
            }
        groups = {group: list(members) for group, members in results.get("group_subtasks", {}).items() if members}
        return cls(metrics, samples, tasks, groups, limit=results.get("config", {}).get("limit"),
                   lm_eval_version=results.get("lm_eval_version"))

    def whole_split(self, task: str) -> bool:
        """Whether every document of ``task``'s split was scored (a group counts when all its tasks were)."""
        if task in self.samples:
            scored, total = self.samples[task]
            return scored == total
        members = self.groups.get(task)
        return bool(members) and all(self.whole_split(member) for member in members)

    def to_eval_results(self) -> List[Any]:
        """``huggingface_hub.EvalResult`` entries (a model card's ``model-index``), one per task and metric.

        Only tasks scored on their whole split and read from a Hub dataset: a partial (``limit``) number or a
        local file has no place in a card. Stderr entries are left out (the format has no slot for them).
        """
        from huggingface_hub import EvalResult

        entries = []
        for task, values in self.metrics.items():
            info = self.tasks.get(task)
            if info is None or not info["path"] or info["path"] in LOCAL_BUILDERS or not self.whole_split(task):
                continue
            for metric, value in values.items():
                if metric.endswith("_stderr") or "_stderr," in metric:
                    continue
                entries.append(EvalResult(
                    task_type="text-generation", task_name=task, dataset_type=info["path"],
                    dataset_name=task, dataset_config=info["name"], dataset_split=info["split"],
                    dataset_args={"num_few_shot": info["num_fewshot"]}, metric_type=metric.split(",")[0],
                    metric_name=f"{metric} (lm-eval {self.lm_eval_version})" if self.lm_eval_version else metric,
                    metric_value=float(value),
                ))
        return entries

    def to_dict(self) -> Dict[str, Any]:
        return {"backend": "lm-eval", "lm_eval_version": self.lm_eval_version, "limit": self.limit,
                "results": self.metrics,
                "samples": {task: {"scored": s, "total": t} for task, (s, t) in self.samples.items()},
                "tasks": self.tasks}


def _metrics(values: Dict[str, Any]) -> Dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...}`` -> ``{"acc": 0.5}``."""
    out = {}
    for key, value in values.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # "alias", "name", "sample_len", and stderr lm-eval could not compute ("N/A")
        metric, _, filter_name = key.partition(",")
        out[metric if filter_name == "none" else key] = float(value)
    return out


@contextlib.contextmanager
def _kept_random_state() -> Iterator[None]:
    """lm-eval seeds Python's, NumPy's and torch's global generators; give the caller theirs back."""
    python_state = random.getstate()
    try:
        import numpy

        numpy_state = numpy.random.get_state()
    except ImportError:  # pragma: no cover - numpy comes with lm-eval
        numpy = None
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            if numpy is not None:
                numpy.random.set_state(numpy_state)


def run_lm_eval(model, tokenizer, tasks: Sequence[str], limit: Optional[float] = None, batch_size: int = 1, *,
                include_path: Union[PathLike, Sequence[PathLike], None] = None, include_defaults: bool = True,
                num_fewshot: Optional[int] = None, bootstrap_iters: int = 100_000) -> LmEvalRun:
    """Run lm-eval ``tasks`` on ``model`` (in memory) with ``tokenizer``; see :func:`evaluate_lm_eval`."""
    if isinstance(tasks, str) or not tasks or not all(isinstance(task, str) and task for task in tasks):
        raise ValueError(f"tasks must be a non-empty list of lm-eval task names, got {tasks!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise ValueError(f"limit must be None (whole splits), a positive count or a fraction, got {limit!r}.")
    simple_evaluate, HFLM, TaskManager = _import_lm_eval()
    paths = None
    if include_path is not None:
        paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
        missing = [str(p) for p in paths if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(f"include_path {missing} does not exist; give folders of lm-eval task YAMLs.")
        paths = [str(p) for p in paths]
    manager = TaskManager(include_path=paths, include_defaults=include_defaults)
    # names only: lm-eval also takes YAML file paths and globs, which it resolves itself
    unknown = [task for task in tasks
               if task not in manager.all_tasks and not any(c in task for c in "*?[") and not Path(task).is_file()]
    if unknown:
        where = f" (searched lm-eval's tasks{' and ' + ', '.join(paths) if paths else ''})"
        raise ValueError(f"Unknown lm-eval task(s) {unknown}{where}; `lm-eval ls tasks` lists them, and a YAML task "
                         "of your own is found through include_path.")
    was_training = model.training
    try:
        with _kept_random_state():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            results = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                      task_manager=manager, log_samples=False, bootstrap_iters=bootstrap_iters)
    finally:
        model.train(was_training)
    if results is None:
        raise RuntimeError("lm-eval returned no results in this process (it reports on rank 0 only).")
    return LmEvalRun.from_results(results)


def evaluate_lm_eval(model, tokenizer, tasks: List[str], limit: Optional[int] = None, batch_size: int = 1,
                     **options) -> Dict[str, Dict[str, float]]:
    """lm-eval's ``simple_evaluate`` of ``tasks`` on ``HFLM(pretrained=model, tokenizer=tokenizer)``:
    task -> metric -> value (``{"arc_easy": {"acc": 0.61, "acc_stderr": 0.01, "acc_norm": ...}}``).

    ``limit``: lm-eval's, the first N documents of each task (a float below 1: a fraction); ``None`` scores
    whole splits. ``options``: ``include_path`` (folders of task YAMLs of one's own), ``include_defaults``
    (``False``: only those; indexing lm-eval's ~10k built-in tasks takes seconds), ``num_fewshot``,
    ``bootstrap_iters``. The model is only read; its training mode and the global random generators are as
    before afterwards. :func:`run_lm_eval` also returns sample counts and datasets.
    """
    return run_lm_eval(model, tokenizer, tasks, limit=limit, batch_size=batch_size, **options).metrics

from pathlib import Path

from . import zeroshot
from .perplexity import evaluation_ids, perplexity, perplexity_report, window_nlls
from .zeroshot import TaskResult, ZeroShotResults, evaluate_tasks, list_tasks

#: Folders of the ``evaluate`` modules shipped with the package: ``evaluate.load(METRICS["perplexity"])``.
METRICS = {path.name: str(path) for path in (Path(__file__).parent / "metrics").iterdir() if path.is_dir()}

__all__ = [
    "METRICS", "TaskResult", "ZeroShotResults", "evaluate_tasks", "evaluation_ids", "list_tasks", "perplexity",
    "perplexity_report", "window_nlls", "zeroshot",
]

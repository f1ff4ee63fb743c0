from pathlib import Path

from .perplexity import evaluation_ids, perplexity, window_nlls

#: Folders of the ``evaluate`` modules shipped with the package: ``evaluate.load(METRICS["perplexity"])``.
METRICS = {path.name: str(path) for path in (Path(__file__).parent / "metrics").iterdir() if path.is_dir()}

__all__ = ["METRICS", "evaluation_ids", "perplexity", "window_nlls"]

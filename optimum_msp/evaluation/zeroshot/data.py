"""Reading task documents: local copies (``shared/data`` layout) first, the Hub datasets lm-eval uses otherwise.

Every local loader returns rows in the *Hub* schema lm-eval's task configs read (e.g. ARC's
``question`` is the stem string and ``choices`` a ``{"text": [...], "label": [...]}`` mapping), so a
task's prompt functions are the same whichever source served the rows.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import List, Optional, Union

from ...utils import local_data_dir
from .registry import ZeroShotTask

logger = logging.getLogger(__name__)

Limit = Union[int, float, None]


def _json_rows(path: Path):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train")


def _read_labels(path: Path) -> List[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _arc_style_rows(folder: Path, question_key: str):
    """ARC / OpenBookQA original jsonl (``question.stem``, ``question.choices[{text,label}]``) -> Hub rows."""
    rows = _json_rows(folder / "test.jsonl")

    def to_hub(row):
        choices = row["question"]["choices"]
        return {
            "id": row["id"],
            question_key: row["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": row["answerKey"],
        }

    return rows.map(to_hub, remove_columns=rows.column_names)


def load_arc_rows(folder: Path):
    """Original ARC jsonl -> allenai/ai2_arc rows."""
    return _arc_style_rows(folder, "question")


def load_openbookqa_rows(folder: Path):
    """Original OpenBookQA jsonl (same shape as ARC) -> allenai/openbookqa ``main`` rows."""
    return _arc_style_rows(folder, "question_stem")


def load_boolq_rows(folder: Path):
    """SuperGLUE BoolQ val.jsonl (boolean ``label``) -> super_glue/boolq rows (ClassLabel 0=False, 1=True)."""
    rows = _json_rows(folder / "superglue_val.jsonl")
    return rows.map(lambda row: {"label": int(bool(row["label"]))})


def load_rte_rows(folder: Path):
    """The Hub's own glue/rte validation parquet (label 0 = entailment): already in lm-eval's schema."""
    from datasets import load_dataset

    return load_dataset("parquet", data_files=str(folder / "validation.parquet"), split="train")


def load_winogrande_rows(folder: Path):
    """winogrande_1.1 dev.jsonl (= winogrande_xl validation); ``answer`` is checked against dev-labels.lst."""
    rows = _json_rows(folder / "dev.jsonl")
    labels = _read_labels(folder / "dev-labels.lst")
    if len(labels) != len(rows) or any(str(a) != b for a, b in zip(rows["answer"], labels)):
        raise ValueError(f"{folder}: dev.jsonl answers disagree with dev-labels.lst")
    return rows.map(lambda row: {"answer": str(row["answer"])})


def load_piqa_rows(folder: Path):
    """Original PIQA valid.jsonl + valid-labels.lst (line i labels row i) -> piqa validation rows."""
    rows = _json_rows(folder / "valid.jsonl")
    labels = [int(label) for label in _read_labels(folder / "valid-labels.lst")]
    if len(labels) != len(rows):
        raise ValueError(f"{folder}: {len(rows)} rows but {len(labels)} labels")
    return rows.add_column("label", labels)


def load_lambada_rows(folder: Path):
    """OpenAI's LAMBADA test.jsonl (``{"text": ...}``), the file behind EleutherAI/lambada_openai."""
    return _json_rows(folder / "test.jsonl")


def local_folder(data_dir: Optional[Union[str, Path]]) -> Optional[Path]:
    """The folder to read local files from: ``data_dir`` if given, else :func:`optimum_msp.utils.local_data_dir`."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data_dir={str(data_dir)!r} is not a folder")
        return path
    return local_data_dir()


def load_hub_rows(task: ZeroShotTask):
    """The split lm-eval evaluates, from the Hub (tries lm-eval's dataset first, then known mirrors)."""
    from datasets import load_dataset

    errors = []
    for source in task.hub:
        try:
            return load_dataset(source.path, source.name, split=source.split)
        except Exception as error:  # network, missing mirror, script datasets no longer supported, ...
            errors.append(f"{source.path}/{source.name or ''}: {type(error).__name__}: {error}")
            logger.warning("Could not load %s from %s (%s)", task.name, source.path, error)
    raise RuntimeError(
        f"No data for zero-shot task {task.name!r}: no local copy was found (set OPTIMUM_MSP_DATA_DIR or pass "
        f"data_dir= to a folder laid out like shared/data) and the Hub failed:\n  " + "\n  ".join(errors)
    )


def resolve_limit(limit: Limit, total: int) -> int:
    """lm-eval's ``limit``: an int keeps the first N docs; a float below 1.0 keeps ceil(fraction * total)."""
    if limit is None:
        return total
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    count = int(math.ceil(total * limit)) if limit < 1.0 else int(limit)
    return min(count, total)


def load_task_docs(
    task: ZeroShotTask,
    limit: Limit = None,
    data_dir: Optional[Union[str, Path]] = None,
    from_hub: bool = False,
) -> List[dict]:
    """The task's processed documents (lm-eval ``process_docs`` applied), in file order, first ``limit`` only."""
    rows, origin = None, None
    folder = None if from_hub else local_folder(data_dir)
    if folder is not None and task.local is not None:
        if task.local.available(folder):
            rows, origin = task.local.load(folder / task.local.subdir), str(folder / task.local.subdir)
        else:
            logger.warning("%s: no local files %s under %s; trying the Hub", task.name, task.local.files, folder)
    if rows is None:
        rows, origin = load_hub_rows(task), f"hub:{task.hub[0].path}"
    count = resolve_limit(limit, len(rows))
    logger.info("%s: %d of %d docs from %s", task.name, count, len(rows), origin)
    # lm-eval applies process_docs to the whole split and slices afterwards; the per-row map commutes with that.
    docs = [dict(row) for row in rows.select(range(count))]
    if task.process_doc is not None:
        docs = [task.process_doc(doc) for doc in docs]
    return docs

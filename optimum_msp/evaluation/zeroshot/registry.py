"""The string-keyed task registry and the shape of one zero-shot task.

A task mirrors one lm-evaluation-harness task config: ``doc_to_text`` / ``doc_to_choice`` /
``doc_to_target`` receive a row in the *Hub* schema that lm-eval reads (local files are converted
to that schema by their loader), and :meth:`ZeroShotTask.build_requests` turns a row into the
``(context, continuation)`` pairs lm-eval would score.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, Union

if TYPE_CHECKING:
    import datasets

MULTIPLE_CHOICE = "multiple_choice"
LOGLIKELIHOOD = "loglikelihood"

Doc = Dict[str, object]


@dataclasses.dataclass(frozen=True)
class HubSource:
    """Where lm-eval loads a task from (``datasets.load_dataset(path, name, split=split)``)."""

    path: str
    name: Optional[str]
    split: str


@dataclasses.dataclass(frozen=True)
class LocalSource:
    """Files of the task inside the local data folder, and the function turning them into Hub-schema rows.

    ``load(folder)`` returns a ``datasets.Dataset``; ``folder`` is ``<data_dir>/<subdir>``.
    """

    subdir: str
    files: Tuple[str, ...]
    load: Callable[[Path], "datasets.Dataset"]

    def available(self, data_dir: Path) -> bool:
        return all((data_dir / self.subdir / name).is_file() for name in self.files)


@dataclasses.dataclass(frozen=True)
class DocRequests:
    """What one document asks of the model, and how to read the answers back."""

    requests: List[Tuple[str, str]]  # (context, continuation) in lm-eval's order
    gold: int
    choices: List[str]  # lm-eval's ``doc_to_choice`` (used for acc_norm lengths)


@dataclasses.dataclass(frozen=True)
class ZeroShotTask:
    name: str
    pretty_name: str  # for tables and model cards
    output_type: str  # MULTIPLE_CHOICE or LOGLIKELIHOOD
    hub: Sequence[HubSource]  # first one is lm-eval's; later ones are accepted mirrors
    local: Optional[LocalSource]
    doc_to_text: Callable[[Doc], Union[str, int]]
    doc_to_target: Callable[[Doc], Union[str, int]]
    doc_to_choice: Optional[Callable[[Doc], List[str]]] = None
    metrics: Tuple[str, ...] = ("acc",)
    # lm-eval ``process_docs``: applied to each Hub-schema row before the doc_to_* functions.
    process_doc: Optional[Callable[[Doc], Doc]] = None
    # lm-eval's "multiple input" mode (WinoGrande partial scoring): the choices are *contexts* and the
    # target is the shared continuation; ``doc_to_text`` then returns the gold index.
    choices_are_contexts: bool = False
    target_delimiter: str = " "

    def build_requests(self, doc: Doc) -> DocRequests:
        """lm-eval's ``fewshot_context`` (zero-shot) + ``construct_requests`` for one processed doc."""
        if self.output_type == LOGLIKELIHOOD:
            # lm-eval passes (doc_to_text, doc_to_target) untouched: the target carries its own space.
            return DocRequests([(str(self.doc_to_text(doc)), str(self.doc_to_target(doc)))], gold=0, choices=[])
        choices = list(self.doc_to_choice(doc))
        if self.choices_are_contexts:
            continuation = f"{self.target_delimiter}{self.doc_to_target(doc)}"
            return DocRequests([(context, continuation) for context in choices], int(self.doc_to_text(doc)), choices)
        context = str(self.doc_to_text(doc))
        target = self.doc_to_target(doc)
        gold = target if isinstance(target, int) else choices.index(target)
        requests = [(context, f"{self.target_delimiter}{choice}") for choice in choices]
        return DocRequests(requests, gold, choices)


_TASKS: Dict[str, ZeroShotTask] = {}


def register_task(task: ZeroShotTask) -> ZeroShotTask:
    if task.name in _TASKS:
        raise ValueError(f"Zero-shot task {task.name!r} is already registered.")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> ZeroShotTask:
    try:
        return _TASKS[name]
    except KeyError:
        raise KeyError(f"Unknown zero-shot task {name!r}; available: {', '.join(list_tasks())}") from None


def list_tasks() -> List[str]:
    return sorted(_TASKS)

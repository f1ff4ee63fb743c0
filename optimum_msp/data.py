"""Calibration windows and evaluation text, from the Hub or from local files, through ``datasets``.

Names understood: ``"wikitext2"`` (Hub ``wikitext``/``wikitext-2-raw-v1``, or the raw files in the local
data folder, see :func:`optimum_msp.utils.local_data_dir`), ``"c4"`` (Hub ``allenai/c4``, English
validation shard), and any local ``.txt`` / ``.raw`` (one row per line) or ``.jsonl`` (a ``"text"`` field)
file. Text is joined as the raw file has it (lines joined by newlines), tokenized once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .utils.paths import local_data_dir

logger = logging.getLogger(__name__)

_WIKITEXT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
DEFAULT_CALIBRATION_SPLIT = {"wikitext2": "validation", "c4": "train"}


def _join_rows(rows) -> str:
    rows = list(rows)
    # Hub copies may keep each line's newline; the "text" builder strips it. Either way, rebuild the file.
    if rows and all(row.endswith("\n") for row in rows if row):
        return "".join(rows)
    return "\n".join(rows)


def _read_utf8(path: Path) -> str:
    """The file's text (UTF-8, universal newlines, as ``datasets``' text builder reads it); a clear error otherwise."""
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"{path} is empty: a calibration or evaluation text needs some text. Point the dataset at "
                         "another file.")
    if b"\x00" in data:
        raise ValueError(f"{path} holds NUL bytes: it looks like a binary file, not text. Give a UTF-8 .txt/.raw or "
                         ".jsonl file.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path} is not UTF-8 text (byte {error.start}, line {line}: {data[error.start:error.start + 1]!r}). "
            "Re-encode it, e.g. `iconv -f latin1 -t utf-8`, or give another file."
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _jsonl_texts(path: Path, text: str) -> List[str]:
    """The ``"text"`` field of every row of a JSON Lines file (or of a JSON array of objects)."""
    stripped = text.lstrip()
    if stripped.startswith("["):  # a .json holding one array of rows
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}).") from None
        numbered = list(enumerate(rows, 1)) if isinstance(rows, list) else [(1, rows)]
        unit = "item"
    else:
        numbered = []
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg} at column {error.colno}). Each "
                                 "line of a .jsonl file must be one JSON object such as {\"text\": \"...\"}.") from None
        unit = "line"
    texts = []
    for number, row in numbered:
        if not isinstance(row, dict):
            raise ValueError(f"{path}, {unit} {number}: expected a JSON object with a \"text\" field, got "
                             f"{type(row).__name__}.")
        if "text" not in row:
            raise ValueError(f"{path}, {unit} {number}: no \"text\" field (fields: {sorted(row)}). Every row needs "
                             "one; rename the field holding the text.")
        if not isinstance(row["text"], str):
            raise ValueError(f"{path}, {unit} {number}: \"text\" must be a string, got {type(row['text']).__name__}.")
        texts.append(row["text"])
    if not texts:
        raise ValueError(f"{path} holds no rows: a calibration or evaluation text needs some text.")
    return texts


def _load_local_file(path: Path) -> str:
    """The text of a local ``.txt``/``.raw`` (lines joined by newlines) or ``.jsonl``/``.json`` file (the rows'
    ``"text"`` joined by blank lines). Read here rather than through ``datasets``, whose errors on a bad file
    (``DatasetGenerationError``) name neither the file nor the problem."""
    text = _read_utf8(path)
    if path.suffix in (".jsonl", ".json"):
        return "\n\n".join(_jsonl_texts(path, text))
    # lines as the text builder splits them (str.splitlines), the final newline dropped
    return _join_rows(text.splitlines())


def load_text(dataset: str, split: str = "test", data_dir: Optional[Path] = None) -> str:
    """The whole text of ``dataset``/``split`` as one string."""
    from datasets import load_dataset

    path = Path(dataset).expanduser()
    if path.suffix and path.is_file():
        return _load_local_file(path)
    if dataset == "wikitext2":
        if split not in _WIKITEXT_FILES:
            raise ValueError(f"wikitext2 has splits {list(_WIKITEXT_FILES)}, not {split!r}.")
        root = data_dir or local_data_dir()
        local = root / "wikitext-2-raw" / _WIKITEXT_FILES[split] if root else None
        if local is not None and local.is_file():
            logger.info("Reading WikiText-2 %s from %s", split, local)
            return _load_local_file(local)
        return _join_rows(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
    if dataset == "c4":
        if split not in _C4_FILES:
            raise ValueError(f"c4 has splits {list(_C4_FILES)}, not {split!r}.")
        rows = load_dataset("allenai/c4", data_files={split: _C4_FILES[split]}, split=split)["text"]
        return "\n\n".join(rows)
    if path.suffix:
        raise FileNotFoundError(f"Dataset file {dataset!r} does not exist.")
    raise ValueError(f"Unknown dataset {dataset!r}: use 'wikitext2', 'c4', or a path to a .txt/.raw/.jsonl file.")


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one ``[1, N]`` tensor (tokenized once, no truncation)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids
    return ids


def sample_starts(
    total: int, num_samples: int, seqlen: int, seed: int, exclude: Optional[List[Tuple[int, int]]] = None
) -> List[int]:
    """Start positions of ``num_samples`` random ``seqlen`` windows in a text of ``total`` tokens.

    Drawn as Wanda/SparseGPT do (uniform over the text, seeded). With ``exclude`` (``(start, length)``
    spans to stay disjoint from, e.g. the calibration windows when drawing fitness windows), the drawn
    windows overlap neither those spans nor each other.
    """
    if total < seqlen + 1:
        raise ValueError(
            f"The calibration text has {total} tokens, shorter than one window of seqlen={seqlen} (+1). "
            "Use a longer dataset or a smaller seqlen."
        )
    if num_samples < 1 or seqlen < 1:
        raise ValueError(f"Windows need num_samples >= 1 and seqlen >= 1, got {num_samples} and {seqlen}.")
    distinct = total - seqlen  # starts are drawn from [0, total - seqlen)
    if num_samples > distinct:
        # more windows than places to start one: the draw would repeat windows (with replacement, as Wanda draws),
        # i.e. weigh part of the text several times while pretending to use num_samples windows
        raise ValueError(
            f"{num_samples} windows of {seqlen} tokens were asked (num_calibration_samples / fitness_samples), but a "
            f"text of {total} tokens has only {distinct} distinct window starts. Ask for at most {distinct} windows, "
            "a smaller seqlen, or a longer text."
        )
    generator = torch.Generator().manual_seed(seed)
    starts: List[int] = []
    taken = None if exclude is None else list(exclude)
    for _ in range(1000 * num_samples):
        if len(starts) == num_samples:
            break
        start = int(torch.randint(0, total - seqlen, (1,), generator=generator))
        if taken is not None:
            if any(start < other + length and other < start + seqlen for other, length in taken):
                continue
            taken.append((start, seqlen))
        starts.append(start)
    if len(starts) < num_samples:
        raise ValueError(f"Cannot fit {num_samples} disjoint windows of {seqlen} tokens in {total} tokens of text.")
    return starts


def take_windows(ids: torch.Tensor, starts: List[int], seqlen: int) -> torch.Tensor:
    """``[len(starts), seqlen]`` windows of ``ids`` ([1, N])."""
    return torch.stack([ids[0, s : s + seqlen] for s in starts])


def locate_windows(ids: torch.Tensor, windows: torch.Tensor, probe: int = 16) -> List[Tuple[int, int]]:
    """``(start, length)`` of every place in ``ids`` ([1, N]) where a row of ``windows`` occurs whole.

    Rows that do not come from this text are absent from the answer. Used to keep the MSP fitness windows
    disjoint from calibration windows the caller built, whatever seed or code drew them.
    """
    text = ids[0]
    length = windows.shape[1]
    probe = min(probe, length)
    if text.numel() < length:
        return []
    heads = text.unfold(0, probe, 1)[: text.numel() - length + 1]  # a view: one row per candidate start
    spans = []
    for row in windows:
        for start in (heads == row[:probe]).all(dim=1).nonzero().flatten().tolist():
            if torch.equal(text[start : start + length], row):
                spans.append((start, length))
    return spans


def calibration_text_ids(tokenizer, dataset: str, split: Optional[str] = None) -> torch.Tensor:
    split = split or DEFAULT_CALIBRATION_SPLIT.get(dataset, "train")
    if Path(dataset).expanduser().is_file():
        split = "train"
    return tokenize_text(tokenizer, load_text(dataset, split))


def calibration_windows(tokenizer, dataset: str, num_samples: int, seqlen: int, seed: int = 0,
                        split: Optional[str] = None) -> torch.Tensor:
    """``[num_samples, seqlen]`` seeded random windows of the calibration text."""
    ids = calibration_text_ids(tokenizer, dataset, split)
    return take_windows(ids, sample_starts(ids.shape[1], num_samples, seqlen, seed), seqlen)


def evaluation_windows(ids: torch.Tensor, seqlen: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows of ``ids`` ([1, N]); the remainder is dropped."""
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1:
        raise ValueError(f"seqlen (tokens per evaluation window) must be a positive integer, got {seqlen!r}.")
    count = ids.shape[1] // seqlen
    if count == 0:
        raise ValueError(f"The evaluation text has {ids.shape[1]} tokens, fewer than one window of {seqlen}.")
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[0, : count * seqlen].reshape(count, seqlen)


@dataclass
class CalibrationData:
    """The calibration of one run, drawn once and handed to every stage that needs data.

    ``ids`` are the ``[samples, seqlen]`` windows the statistics, the Fisher pass and the final prune use;
    :meth:`held_out` draws windows of the same text that overlap none of them (the MSP search's fitness),
    never from an evaluation split. ``recipe`` is what the plan records about the calibration.
    """

    ids: torch.Tensor
    recipe: Dict[str, Any] = field(default_factory=dict)
    #: the held-out windows, when the caller gave them (``fitness_ids=``)
    held_out_ids: Optional[torch.Tensor] = None
    #: loads the whole calibration text as ``[1, N]`` token ids (only when held-out windows are drawn)
    text_loader: Optional[Callable[[], torch.Tensor]] = None

    @classmethod
    def draw(cls, tokenizer, dataset: str, num_samples: int, seqlen: int, seed: int = 0,
             split: Optional[str] = None) -> "CalibrationData":
        """``num_samples`` seeded random windows of the calibration text (tokenized once)."""
        text_ids = calibration_text_ids(tokenizer, dataset, split)
        ids = take_windows(text_ids, sample_starts(text_ids.shape[1], num_samples, seqlen, seed), seqlen)
        return cls(ids, _recipe(dataset, split, ids, seed), text_loader=lambda: text_ids)

    @classmethod
    def given(cls, ids: torch.Tensor, tokenizer=None, dataset: Optional[str] = None, split: Optional[str] = None,
              seed: Optional[int] = None, held_out_ids: Optional[torch.Tensor] = None) -> "CalibrationData":
        """Windows the caller built; with a tokenizer, held-out windows are drawn from ``dataset``'s text."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError("calibration= must be a [samples, seqlen] tensor of token ids.")
        loader = None
        if tokenizer is not None and dataset is not None:
            def loader():
                return calibration_text_ids(tokenizer, dataset, split)
        return cls(ids, _recipe(dataset, split, ids, seed), held_out_ids, loader)

    def held_out(self, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
        """``[num_samples, seqlen]`` windows of the calibration text disjoint from every window of ``ids``."""
        if self.held_out_ids is not None:
            return self.held_out_ids
        if self.text_loader is None:
            raise ValueError("Held-out windows (the MSP search's fitness) need the calibration text: give the pruner "
                             "a tokenizer, or pass fitness_ids=.")
        text_ids = self.text_loader()
        # the windows actually used, wherever they came from (drawn here, or built by the caller)
        taken = locate_windows(text_ids, self.ids)
        starts = sample_starts(text_ids.shape[1], num_samples, seqlen, seed, exclude=taken)
        return take_windows(text_ids, starts, seqlen)


def _recipe(dataset, split, ids: torch.Tensor, seed) -> Dict[str, Any]:
    if split is None and dataset is not None:  # record the split actually used, not "the default"
        split = "train" if Path(dataset).expanduser().is_file() else DEFAULT_CALIBRATION_SPLIT.get(dataset, "train")
    return {"dataset": dataset, "split": split, "num_samples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
            "seed": seed}

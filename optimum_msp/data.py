"""Calibration windows and evaluation text, from the Hub or from local files, through ``datasets``.

Names understood: ``"wikitext2"`` (Hub ``wikitext``/``wikitext-2-raw-v1``, or the raw files in the local
data folder, see :func:`optimum_msp.utils.local_data_dir`), ``"c4"`` (Hub ``allenai/c4``, English
validation shard), and any local ``.txt`` / ``.raw`` (one row per line) or ``.jsonl`` (a ``"text"`` field)
file. Text is joined as the raw file has it (lines joined by newlines), tokenized once.

**BOS.** The text is tokenized without special tokens; whether a window starts with the tokenizer's
beginning-of-sequence token is the ``bos`` rule (:func:`resolve_bos`), applied the same way to every window a
model is fed: calibration windows (and so the Fisher windows, their slices), the MSP search's held-out windows
and perplexity windows. ``"auto"`` (the default) prepends BOS when the tokenizer adds one to a plain encode
(``tokenizer("x").input_ids`` starts with ``bos_token_id``: LLaMA-2, Gemma; not GPT-2 or SmolLM2), ``"always"`` /
``"never"`` force it; ``"never"`` is the literature protocol (SparseGPT / Wanda LLaMA tables). A window's
``seqlen`` is its total length, BOS included: a BOS window holds ``seqlen - 1`` text tokens.
"""

from __future__ import annotations

import functools
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
    """Token ids of ``text`` as one ``[1, N]`` tensor (tokenized once, no truncation, no special tokens: a BOS
    is put at the start of each window, by the ``bos`` rule, not once at the start of the text)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids
    return ids


#: the values of the ``bos`` setting (``MSPConfig.bos``, ``perplexity(bos=...)``); ``True`` / ``False`` are also
#: accepted in Python for ``"always"`` / ``"never"``
BOS_CHOICES = ("auto", "always", "never")
#: the ``bos`` value of the literature protocol (SparseGPT / Wanda LLaMA tables): no window starts with BOS
LITERATURE_BOS = "never"

Bos = str | bool  # a bos setting: one of BOS_CHOICES, or True / False


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` puts its BOS token first in a plain encode (``tokenizer("x").input_ids[0] ==
    bos_token_id``): what lm-eval's HFLM encodes with its ``add_bos_token`` unset. False without a BOS token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or bos is None:
        return False
    ids = tokenizer("x").input_ids
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    elif ids and isinstance(ids[0], (list, tuple)):
        ids = ids[0]
    return len(ids) > 0 and int(ids[0]) == int(bos)


def resolve_bos(bos: Bos, tokenizer) -> Optional[int]:
    """The token id to put first in every window under the ``bos`` rule, or ``None`` for no BOS.

    ``"auto"``: the tokenizer's BOS when :func:`tokenizer_adds_bos` (without a tokenizer: none); ``"always"`` /
    ``True``: the tokenizer's BOS, an error when it has none; ``"never"`` / ``False``: none (the literature
    protocol, :data:`LITERATURE_BOS`).
    """
    if bos is True:
        bos = "always"
    elif bos is False:
        bos = "never"
    if bos not in BOS_CHOICES:
        raise ValueError(f"bos must be one of {list(BOS_CHOICES)} (or True / False), got {bos!r}.")
    if bos == "never":
        return None
    if bos == "auto":
        return int(tokenizer.bos_token_id) if tokenizer_adds_bos(tokenizer) else None
    token_id = getattr(tokenizer, "bos_token_id", None)
    if token_id is None:
        what = ("no tokenizer was given" if tokenizer is None
                else f"the tokenizer ({type(tokenizer).__name__}) has no BOS token")
        raise ValueError(f"bos='always' puts the tokenizer's BOS token first in every window, but {what}; "
                         "use bos='auto' or bos='never'.")
    return int(token_id)


def text_length(seqlen: int, bos_token_id: Optional[int]) -> int:
    """Text tokens in a window of ``seqlen`` tokens (one fewer with a BOS); an error when none would be left."""
    length = seqlen - (bos_token_id is not None)
    if length < 1:
        raise ValueError(f"A window of seqlen={seqlen} token(s) holds only the BOS token, no text: seqlen counts "
                         "the BOS, use seqlen >= 2 (or bos='never').")
    return length


def with_bos(windows: torch.Tensor, bos_token_id: Optional[int]) -> torch.Tensor:
    """``windows`` ([n, L]) with ``bos_token_id`` put first in every row ([n, L + 1]); unchanged for ``None``."""
    if bos_token_id is None:
        return windows
    column = torch.full((windows.shape[0], 1), bos_token_id, dtype=windows.dtype, device=windows.device)
    return torch.cat([column, windows], dim=1)


def starts_with_bos(windows: torch.Tensor, bos_token_id: Optional[int]) -> bool:
    """Whether every row of ``windows`` begins with ``bos_token_id`` (and holds more than that token)."""
    return (bos_token_id is not None and windows.dim() == 2 and windows.shape[1] > 1
            and bool((windows[:, 0] == bos_token_id).all()))


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
                        split: Optional[str] = None, bos: Bos = "auto") -> torch.Tensor:
    """``[num_samples, seqlen]`` seeded random windows of the calibration text, each starting with BOS when the
    ``bos`` rule says so (``seqlen`` counts it); the windows :meth:`CalibrationData.draw` draws."""
    return CalibrationData.draw(tokenizer, dataset, num_samples, seqlen, seed, split, bos=bos).ids


def evaluation_windows(ids: torch.Tensor, seqlen: int, max_windows: Optional[int] = None,
                       bos_token_id: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows of ``ids`` ([1, N]); the remainder is dropped.

    With ``bos_token_id`` every window is that token then the next ``seqlen - 1`` text tokens (the text is cut
    every ``seqlen - 1`` tokens); without, ``seqlen`` text tokens (the literature protocol).
    """
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1:
        raise ValueError(f"seqlen (tokens per evaluation window) must be a positive integer, got {seqlen!r}.")
    length = text_length(seqlen, bos_token_id)
    count = ids.shape[1] // length
    if count == 0:
        raise ValueError(f"The evaluation text has {ids.shape[1]} tokens, fewer than one window of {length}"
                         f"{' text tokens after the BOS' if bos_token_id is not None else ''}.")
    if max_windows is not None:
        count = min(count, max_windows)
    return with_bos(ids[0, : count * length].reshape(count, length), bos_token_id)


@dataclass
class CalibrationData:
    """The calibration of one run, drawn once and handed to every stage that needs data.

    ``ids`` are the ``[samples, seqlen]`` windows the statistics, the Fisher pass and the final prune use;
    :meth:`held_out` draws windows of the same text that overlap none of them (the MSP search's fitness),
    never from an evaluation split. ``recipe`` is what the plan records about the calibration, ``bos`` (whether
    the windows start with the BOS token) included.

    ``bos_token_id`` is the token put first in every drawn window (the ``bos`` rule, :func:`resolve_bos`), or
    ``None``: the calibration windows of :meth:`draw` and the held-out windows both follow it, and ``seqlen``
    counts it (a BOS window holds ``seqlen - 1`` text tokens).
    """

    ids: torch.Tensor
    recipe: Dict[str, Any] = field(default_factory=dict)
    #: the held-out windows, when the caller gave them (``fitness_ids=``)
    held_out_ids: Optional[torch.Tensor] = None
    #: loads the whole calibration text as ``[1, N]`` token ids (only when held-out windows are drawn)
    text_loader: Optional[Callable[[], torch.Tensor]] = None
    #: the BOS token put first in drawn windows (held-out windows too), or ``None``
    bos_token_id: Optional[int] = None
    #: whether the first column of ``ids`` is a BOS token rather than text (to keep held-out windows disjoint)
    ids_start_with_bos: bool = False

    @classmethod
    def draw(cls, tokenizer, dataset: str, num_samples: int, seqlen: int, seed: int = 0,
             split: Optional[str] = None, bos: Bos = "auto") -> "CalibrationData":
        """``num_samples`` seeded random windows of the calibration text (tokenized once), each the tokenizer's
        BOS then ``seqlen - 1`` text tokens when the ``bos`` rule (:func:`resolve_bos`) says so, else ``seqlen``
        text tokens."""
        bos_token_id = resolve_bos(bos, tokenizer)
        length = text_length(seqlen, bos_token_id)
        text_ids = calibration_text_ids(tokenizer, dataset, split)
        ids = with_bos(take_windows(text_ids, sample_starts(text_ids.shape[1], num_samples, length, seed), length),
                       bos_token_id)
        return cls(ids, _recipe(dataset, split, ids, seed, bos_token_id is not None), text_loader=lambda: text_ids,
                   bos_token_id=bos_token_id, ids_start_with_bos=bos_token_id is not None)

    @classmethod
    def given(cls, ids: torch.Tensor, tokenizer=None, dataset: Optional[str] = None, split: Optional[str] = None,
              seed: Optional[int] = None, held_out_ids: Optional[torch.Tensor] = None,
              bos: Bos = "auto") -> "CalibrationData":
        """Windows the caller built, used as they are; with a tokenizer, held-out windows are drawn from
        ``dataset``'s text, starting with BOS when the ``bos`` rule says so. The recipe's ``bos`` says whether the
        given windows start with the tokenizer's BOS token (``None`` without a tokenizer: not known)."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError("calibration= must be a [samples, seqlen] tensor of token ids.")
        loader: Optional[Callable[[], torch.Tensor]] = None
        bos_token_id, given_bos = None, None
        if tokenizer is not None:
            bos_token_id = resolve_bos(bos, tokenizer)
            given_bos = starts_with_bos(ids, getattr(tokenizer, "bos_token_id", None))
            if given_bos != (bos_token_id is not None):
                logger.warning(
                    "The calibration windows given %s with the BOS token, but bos=%r %s: the MSP search's held-out "
                    "windows follow the bos setting.", "start" if given_bos else "do not start", bos,
                    "prepends it" if bos_token_id is not None else "leaves it out")
            if dataset is not None:
                loader = functools.partial(calibration_text_ids, tokenizer, dataset, split)
        return cls(ids, _recipe(dataset, split, ids, seed, given_bos), held_out_ids, loader, bos_token_id,
                   bool(given_bos))

    def held_out(self, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
        """``[num_samples, seqlen]`` windows of the calibration text disjoint from every window of ``ids``, each
        starting with BOS when the calibration's ``bos`` rule says so (``seqlen`` counts it)."""
        if self.held_out_ids is not None:
            return self.held_out_ids
        if self.text_loader is None:
            raise ValueError("Held-out windows (the MSP search's fitness) need the calibration text: give the pruner "
                             "a tokenizer, or pass fitness_ids=.")
        length = text_length(seqlen, self.bos_token_id)
        text_ids = self.text_loader()
        # the windows actually used, wherever they came from (drawn here, or built by the caller), as text
        taken = locate_windows(text_ids, self.ids[:, 1:] if self.ids_start_with_bos else self.ids)
        starts = sample_starts(text_ids.shape[1], num_samples, length, seed, exclude=taken)
        return with_bos(take_windows(text_ids, starts, length), self.bos_token_id)


def _recipe(dataset, split, ids: torch.Tensor, seed, bos: Optional[bool] = None) -> Dict[str, Any]:
    if split is None and dataset is not None:  # record the split actually used, not "the default"
        split = "train" if Path(dataset).expanduser().is_file() else DEFAULT_CALIBRATION_SPLIT.get(dataset, "train")
    # seqlen is the windows' whole length, the BOS (bos: true) included
    return {"dataset": dataset, "split": split, "num_samples": int(ids.shape[0]), "seqlen": int(ids.shape[1]),
            "seed": seed, "bos": bos}

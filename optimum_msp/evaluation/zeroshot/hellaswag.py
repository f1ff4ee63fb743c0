"""HellaSwag: lm-eval's preprocessing, and rebuilding its row schema from the local llama.cpp-format file.

lm-eval (``tasks/hellaswag/utils.py``) builds each prompt from a Rowan/hellaswag row as::

    query   = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
    choices = [preprocess(ending) for ending in endings]

The local ``hellaswag_val_full.txt`` (6 lines per task, made by klosax/hellaswag_text_data's
``extract_hellaswag.cpp`` from the official ``hellaswag_val.jsonl``) stores instead::

    pp(activity_label) + ": " + pp(ctx)       with ctx = ctx_a + " " + ctx_b (ctx_b *not* capitalised)
    label
    pp(ending_0) ... pp(ending_3)

where ``pp`` deletes ``[header]``/``[step]``/``[substeps]``, turns `` [title]`` into ``". "``, collapses
double spaces and trims. How this maps back to lm-eval's prompt:

* ``ctx_b`` is only non-empty for ActivityNet rows, where it is the unfinished phrase after the last
  sentence (``"... sitting on a roof. he"``). WikiHow contexts end with a full sentence and have an
  empty ``ctx_b``. :func:`split_context` therefore treats the text after the last ``". "`` as ``ctx_b``
  when the context does not end a sentence (3,243 of the 10,042 rows, the ActivityNet share), so
  ``ctx_b.capitalize()`` ("he" -> "He") is reproduced.
* lm-eval's ``preprocess`` is applied again on top. It is idempotent on ``pp``'s output except that its
  ``\\[.*?\\]`` also deletes other bracketed text (e.g. ``[www.kiddio.org]``), which lm-eval deletes from
  the original too, so re-applying it moves the local text *towards* lm-eval's.

Known residual differences: rows whose ``ctx_b`` itself contains ``". "`` are split at the wrong
place, and spacing can differ by one character where the original had runs of 3+ spaces around a
removed tag. Both are rare; scores are expected within a few tenths of a point of lm-eval on the
Hub data, not bit-identical (that needs the original jsonl, not available here).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Tuple

_BRACKETED = re.compile("\\[.*?\\]")
_ENDS_A_SENTENCE = re.compile(r"[.!?][\"')\]]*$")
_LINES_PER_TASK = 6


def preprocess(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess`` (WikiHow's bracket artifacts out, double spaces collapsed once)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = _BRACKETED.sub("", text)
    text = text.replace("  ", " ")
    return text


def process_doc(doc: Dict) -> Dict:
    """lm-eval's ``process_docs`` for one Rowan/hellaswag row."""
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        **doc,
        "query": preprocess(doc["activity_label"] + ": " + context),
        "choices": [preprocess(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def split_context(context: str) -> Tuple[str, str]:
    """Recover ``(ctx_a, ctx_b)`` from the joined ``ctx`` (see the module docstring)."""
    if _ENDS_A_SENTENCE.search(context):
        return context, ""
    cut = max(context.rfind(". "), context.rfind("! "), context.rfind("? "))
    if cut < 0:
        return "", context
    return context[: cut + 1], context[cut + 2 :]


def load_hellaswag_rows(folder: Path):
    """``hellaswag_val_full.txt`` -> Rowan/hellaswag validation rows (``ctx_a``/``ctx_b`` rebuilt)."""
    from datasets import Dataset

    # Read by "\n" ourselves: the `text` builder's str.splitlines would also split on \x85, \u2028, ...
    lines = (folder / "hellaswag_val_full.txt").read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % _LINES_PER_TASK:
        raise ValueError(f"{folder}: {len(lines)} lines is not a multiple of {_LINES_PER_TASK}")
    columns = {key: [] for key in ("activity_label", "ctx_a", "ctx_b", "ctx", "endings", "label")}
    for start in range(0, len(lines), _LINES_PER_TASK):
        header, label, *endings = lines[start : start + _LINES_PER_TASK]
        activity_label, context = header.split(": ", 1)
        ctx_a, ctx_b = split_context(context)
        for key, value in zip(columns, (activity_label, ctx_a, ctx_b, context, endings, label.strip())):
            columns[key].append(value)
    return Dataset.from_dict(columns)

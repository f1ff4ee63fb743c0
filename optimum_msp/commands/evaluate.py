"""``optimum-msp eval``: perplexity and zero-shot accuracy of a (pruned) model.

A table on screen, the results as JSON with ``--output``, and with ``--update-card`` added to a pruned folder's
model card (``model-index``) and ``report.md``. The ``builtin`` backend is this package's offline scorer (lm-eval's
prompts and metrics, ``docs/zeroshot.md``); ``lm-eval`` runs lm-evaluation-harness itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .common import add_device_arguments, add_verb, loading_kwargs, set_threads, table

logger = logging.getLogger(__name__)

#: perplexity "tasks" and the split each is measured on
PERPLEXITY_SPLITS = {"wikitext2": "test", "c4": "validation"}
BACKENDS = ("builtin", "lm-eval")
LM_EVAL_INSTALL = 'pip install "optimum-msp[lm-eval]"'


def add_parser(sub) -> None:
    from ..evaluation.zeroshot import list_tasks

    parser = add_verb(
        sub, "eval", "perplexity and zero-shot accuracy of a model or a pruned folder",
        "Evaluate a model: perplexity (wikitext2: the WikiText-2 raw test split in windows of --seqlen tokens; c4: "
        "its validation shard) and zero-shot tasks scored as lm-evaluation-harness 0.4 scores them (offline with "
        "the builtin backend). Prints a table; --output writes the results as JSON; --update-card adds them to a "
        "folder saved by optimum-msp (model card and report.md).",
        ["optimum-msp eval out/smollm2-wanda-msp-75 --tasks wikitext2 --limit 16",
         "optimum-msp eval out/smollm2-wanda-msp-75 --tasks wikitext2,arc_easy,hellaswag --output results.json "
         "--update-card",
         "optimum-msp eval smollm2-135m --tasks arc_easy --limit 200 --backend lm-eval"])
    parser.add_argument("model", help="a folder saved by optimum-msp, any model folder, Hub id or alias")
    parser.add_argument("--tasks", default="wikitext2",
                        help="comma-separated tasks: wikitext2 or c4 (perplexity) and zero-shot tasks: "
                             + ", ".join(list_tasks()) + " (with --backend lm-eval: lm-eval's task names)")
    parser.add_argument("--limit", type=int, default=None,
                        help="the first N documents of each zero-shot task (lm-eval's --limit), the first N windows "
                             "of perplexity (default: all)")
    parser.add_argument("--output", "-o", default=None, help="write the results as JSON to this file")
    parser.add_argument("--update-card", action="store_true",
                        help="add the results to the folder's model card (README.md model-index) and report.md; "
                             "MODEL must be a folder saved by optimum-msp")
    parser.add_argument("--backend", choices=BACKENDS, default="builtin",
                        help=f"builtin: this package's scorer (offline); lm-eval: lm-evaluation-harness "
                             f"({LM_EVAL_INSTALL})")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per perplexity window")
    parser.add_argument("--bos", default="auto", choices=["auto", "always", "never"],
                        help="perplexity windows start with the BOS token: auto (when the tokenizer adds one), "
                             "always, or never (the literature protocol)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per forward pass (default: 1 for perplexity, 32 for zero-shot)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    add_device_arguments(parser)
    parser.set_defaults(func=run)


def parse_tasks(text: str, backend: str) -> Tuple[List[str], List[str]]:
    """(perplexity datasets, zero-shot tasks) named by ``--tasks``; an unknown name is a ``ValueError``."""
    from ..evaluation.zeroshot import list_tasks

    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise ValueError("--tasks is empty: name at least one task, e.g. --tasks wikitext2,arc_easy.")
    if backend == "lm-eval":
        return [], names  # lm-eval knows its own tasks
    known = list(PERPLEXITY_SPLITS) + list_tasks()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown)}; choose from {', '.join(known)} (or use "
                         "--backend lm-eval for lm-eval's own tasks).")
    return [n for n in names if n in PERPLEXITY_SPLITS], [n for n in names if n not in PERPLEXITY_SPLITS]


def _check_args(args: argparse.Namespace) -> None:
    """Every mistake the flags can hold, before any model is loaded."""
    from ..checkpoint.marker import is_pruned_checkpoint

    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}.")
    if args.seqlen < 2:
        raise ValueError(f"--seqlen must be at least 2 (a window predicts its tokens after the first), got "
                         f"{args.seqlen}.")
    if args.output is not None and Path(args.output).is_dir():
        raise ValueError(f"--output {args.output} is a folder; give a file name such as results.json.")
    if args.update_card and args.limit is not None:
        raise ValueError("--update-card records whole-split results only (a model card never holds a partial "
                         "number): drop --limit, or keep the partial results with --output.")
    if args.update_card and not (Path(args.model).is_dir() and is_pruned_checkpoint(Path(args.model))):
        raise ValueError(f"--update-card needs a folder saved by optimum-msp; {args.model} is not one (drop "
                         "--update-card, or evaluate the pruned folder).")


def _lm_eval_backend():
    """``evaluate_lm_eval``, or an ``ImportError`` saying what to install."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError(f"--backend lm-eval needs lm-evaluation-harness: {LM_EVAL_INSTALL}") from None
    try:
        from ..evaluation.lm_eval import evaluate_lm_eval
    except ImportError as error:
        raise ImportError(f"--backend lm-eval is not available in this installation ({error}): "
                          f"{LM_EVAL_INSTALL}") from None
    return evaluate_lm_eval


def run(args: argparse.Namespace) -> int:
    from ..modeling import load_model, load_tokenizer

    _check_args(args)
    perplexity_tasks, zeroshot_tasks = parse_tasks(args.tasks, args.backend)
    lm_eval = _lm_eval_backend() if args.backend == "lm-eval" else None  # before minutes of loading
    set_threads(args.threads)
    loading = loading_kwargs(args)
    device = loading.pop("device")
    model, tokenizer = load_model(args.model, **loading), load_tokenizer(args.model)
    if device is not None and "device_map" not in loading:
        model = model.to(device)  # evaluation runs the whole model: it must fit there (else use --device-map)
    started = time.perf_counter()
    if lm_eval is not None:
        scores = lm_eval(model, tokenizer, zeroshot_tasks, limit=args.limit, batch_size=args.batch_size or 1)
        results = {task: dict(metrics) for task, metrics in scores.items()}
        rows = [(task, metric, _show(value), "", "") for task, metrics in results.items()
                for metric, value in metrics.items()]
        card_results = _lm_eval_card_results(results, args.limit)
    else:
        results, rows, card_results = _builtin(model, tokenizer, perplexity_tasks, zeroshot_tasks, args)
    print(table(["task", "metric", "value", "stderr", "n"], rows, right=[2, 3, 4]))
    record = {"model": args.model, "backend": args.backend, "limit": args.limit, "results": results,
              "seconds": round(time.perf_counter() - started, 1)}
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"\nresults written to {path}")
    if args.update_card:
        update_card(Path(args.model), card_results)
        print(f"results added to {Path(args.model) / 'README.md'} and report.md")
    return 0


def _show(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _builtin(model, tokenizer, perplexity_tasks: List[str], zeroshot_tasks: List[str], args: argparse.Namespace):
    from ..evaluation import evaluate_tasks, perplexity_report
    from ..integrations.model_card import perplexity_result

    results: Dict[str, Dict[str, Any]] = {}
    rows: List[tuple] = []
    card_results: List[Any] = []
    for task in perplexity_tasks:
        split = PERPLEXITY_SPLITS[task]
        report = perplexity_report(model, tokenizer, task, split, seqlen=args.seqlen, max_windows=args.limit,
                                   batch_size=args.batch_size or 1, bos=args.bos)
        results[task] = {"perplexity": report["perplexity"], "split": split, "windows": report["windows"],
                         "seqlen": args.seqlen, "bos": report["bos"]}
        rows.append((task, "perplexity", f"{report['perplexity']:.4f}", "", f"{report['windows']} windows"))
        card = perplexity_result(report["perplexity"], dataset=task, split=split, seqlen=args.seqlen,
                                 bos=report["bos"])
        card_results.append(card)  # only used with --update-card, which refuses --limit: whole splits only
    if zeroshot_tasks:
        scored = evaluate_tasks(model, tokenizer, tasks=zeroshot_tasks, limit=args.limit,
                                batch_size=args.batch_size or 32)
        for result in scored:
            metrics = result.metrics()
            results[result.task] = {**metrics, **{f"{name}_stderr": getattr(result, f"{name}_stderr")
                                                  for name in metrics}, "n": result.n}
            for name, value in metrics.items():
                stderr = getattr(result, f"{name}_stderr")
                rows.append((result.task, name, f"{value:.4f}", f"{stderr:.4f}", result.n))
        from huggingface_hub.repocard_data import model_index_to_eval_results

        card_results += model_index_to_eval_results(scored.to_model_index("model"))[1]
    return results, rows, card_results


def _lm_eval_card_results(results: Dict[str, Dict[str, Any]], limit: Optional[int]) -> List[Any]:
    from huggingface_hub import EvalResult

    return [EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task, metric_type=metric,
                       metric_value=value, dataset_args={"limit": limit, "harness": "lm-eval"} if limit else
                       {"harness": "lm-eval"})
            for task, metrics in results.items() for metric, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)]


def _key(result) -> tuple:
    """What makes two card results the same measurement (a newer one replaces the older)."""
    return (result.dataset_type, result.dataset_config, result.dataset_split, result.metric_type, result.metric_name,
            json.dumps(result.dataset_args or {}, sort_keys=True))


def update_card(folder: Path, new_results: List[Any]) -> None:
    """Add ``new_results`` to the folder's model card (a result of the same measurement is replaced) and rewrite
    the card and ``report.md``, each replaced whole."""
    from huggingface_hub import ModelCard

    from ..integrations.model_card import build_model_card
    from ..modeling.loading import base_model_id
    from ..plotting import PLOT_FILENAME
    from ..report import read_plan, write_report
    from ..utils.io import write_text_atomically

    plan = read_plan(folder)
    card_path = folder / "README.md"
    data = ModelCard.load(card_path).data if card_path.is_file() else None
    merged = {_key(result): result for result in (getattr(data, "eval_results", None) or [])}
    merged.update({_key(result): result for result in new_results})
    card = build_model_card(plan, getattr(data, "base_model", None) or base_model_id(folder), list(merged.values()),
                            model_name=getattr(data, "model_name", None),
                            plot_path=PLOT_FILENAME if (folder / PLOT_FILENAME).is_file() else None)
    write_text_atomically(card_path, str(card))
    write_report(folder)

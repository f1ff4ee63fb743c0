"""Zero-shot benchmark: lm-eval-style accuracies of SmolLM2-135M (dense) and optionally a pruned model, plus the
throughput of shared-context (KV-cache reuse) scoring against naive per-choice scoring.

    python bench/zeroshot.py --limit 500 --threads 1                      # dense only
    python bench/zeroshot.py --model path/to/pruned --limit 500          # dense + pruned
    python bench/zeroshot.py --model path/to/pruned --no-dense --no-speed  # pruned column only
    python bench/zeroshot.py --merge dense.json pruned.json            # one table from saved --json reports

Prints markdown tables (accuracy ± lm-eval stderr, n, wall time; then examples/s of both scoring modes on the
first --speed-limit documents of each task, tokenization excluded, same batch size).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time

import torch

from optimum_msp.evaluation import zeroshot
from optimum_msp.evaluation.zeroshot import DEFAULT_TASKS, LoglikelihoodScorer, get_task, load_task_docs
from optimum_msp.modeling import load_model, load_tokenizer

DENSE = "smollm2-135m"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[], help="pruned model folder / Hub id (repeatable)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated task names")
    parser.add_argument("--limit", type=float, default=500, help="first N documents per task (lm-eval --limit)")
    parser.add_argument("--full", action="store_true", help="whole splits (no --limit)")
    parser.add_argument("--speed-limit", type=int, default=100, help="documents per task for the throughput table")
    parser.add_argument("--no-speed", action="store_true", help="skip the throughput comparison")
    parser.add_argument("--no-dense", action="store_true",
                        help="accuracy columns for the --model folders only (the dense column already measured)")
    parser.add_argument("--speed-only", action="store_true", help="only the throughput comparison (dense model)")
    parser.add_argument("--repeats", type=int, default=2, help="timing runs per mode (fastest kept)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write all numbers to this file")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="only print one accuracy table from the model columns of saved --json reports")
    args = parser.parse_args(argv)
    args.limit = None if args.full else int(args.limit) if args.limit >= 1 else args.limit
    args.tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    return args


def accuracy_table(columns) -> str:
    """columns: list of (model label, ZeroShotResults)."""
    header = ["task", "n"]
    for label, _ in columns:
        header += [f"{label} acc (%)", f"{label} acc_norm (%) / ppl", f"{label} time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in columns[0][1].results:
        row = [task, str(columns[0][1][task].n)]
        for _, results in columns:
            result = results[task]
            second = "-"
            if result.acc_norm is not None:
                second = f"{100 * result.acc_norm:.2f} ± {100 * result.acc_norm_stderr:.2f}"
            elif result.perplexity is not None:
                second = f"ppl {result.perplexity:.2f} ± {result.perplexity_stderr:.2f}"
            row += [f"{100 * result.acc:.2f} ± {100 * result.acc_stderr:.2f}", second, f"{result.seconds:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def measure_throughput(model, tokenizer, tasks, docs_per_task: int, batch_size: int, repeats: int = 2):
    """Per task: (docs, requests, shared-context seconds, naive seconds, max |ll difference|).

    The two modes alternate and each keeps its fastest of ``repeats`` runs, so that load from other
    processes on the machine hits both alike.
    """
    rows = []
    # Warm-up: the first forwards of a process pay one-off allocation costs that would bias the first timing.
    LoglikelihoodScorer(model, tokenizer, show_progress=False).score([("Question: warm up\nAnswer:", " yes")] * 2)
    for name in tasks:
        task = get_task(name)
        docs = load_task_docs(task, limit=docs_per_task)
        requests = [request for doc in docs for request in task.build_requests(doc).requests]
        timings, scores = {True: float("inf"), False: float("inf")}, {}
        for _ in range(repeats):
            for share in (True, False):
                scorer = LoglikelihoodScorer(model, tokenizer, batch_size=batch_size, share_context=share,
                                             show_progress=False)
                pairs = scorer.tokenize(requests)
                start = time.perf_counter()
                scores[share] = scorer.score_tokens(pairs)
                timings[share] = min(timings[share], time.perf_counter() - start)
        difference = max(abs(a[0] - b[0]) for a, b in zip(scores[True], scores[False]))
        rows.append((name, len(docs), len(requests), timings[True], timings[False], difference))
        logging.info("%s: shared %.1fs, naive %.1fs", name, timings[True], timings[False])
    return rows


def throughput_table(rows) -> str:
    lines = [
        "| task | docs | requests | shared-context (examples/s) | naive per-choice (examples/s) | speed-up "
        "| max abs ll diff |",
        "|---|---|---|---|---|---|---|",
    ]
    total_shared = total_naive = total_docs = 0
    for name, docs, requests, shared, naive, difference in rows:
        lines.append(f"| {name} | {docs} | {requests} | {docs / shared:.2f} | {docs / naive:.2f} | "
                     f"{naive / shared:.2f}x | {difference:.1e} |")
        total_shared, total_naive, total_docs = total_shared + shared, total_naive + naive, total_docs + docs
    if rows:
        lines.append(f"| **all** | {total_docs} | | {total_docs / total_shared:.2f} | {total_docs / total_naive:.2f} "
                     f"| {total_naive / total_shared:.2f}x | |")
    return "\n".join(lines)


def _load_average():
    try:
        return " ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def merged_table(paths) -> str:
    """The accuracy columns of several saved reports side by side (each labelled by its model name)."""
    from optimum_msp.evaluation.zeroshot import TaskResult, ZeroShotResults

    columns = []
    for path in paths:
        with open(path) as handle:
            report = json.load(handle)
        for entry in report.values():
            if isinstance(entry, dict) and "results" in entry:
                results = {task: TaskResult(**fields) for task, fields in entry["results"].items()}
                columns.append((os.path.basename(entry["name"].rstrip("/")), ZeroShotResults(results)))
    tasks = set.intersection(*(set(results.results) for _, results in columns))
    columns = [(label, ZeroShotResults({task: r[task] for task in r.results if task in tasks})) for label, r in columns]
    return accuracy_table(columns)


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        sys.stdout.write(merged_table(args.merge) + "\n")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = {"command": "python bench/zeroshot.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "threads": args.threads, "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    columns = []
    dense_model = None
    models = [] if args.no_dense or args.speed_only else [("dense", DENSE)]
    if not args.speed_only:
        models += [(f"model {i + 1}", path) for i, path in enumerate(args.model)]
    for label, name in models:
        model, tokenizer = load_model(name), load_tokenizer(name)
        if name == DENSE:
            dense_model = (model, tokenizer)
        results = zeroshot.evaluate_tasks(model, tokenizer, tasks=args.tasks, limit=args.limit,
                                          batch_size=args.batch_size)
        columns.append((label, results))
        report[label] = {"name": name, **results.to_dict()}
    out = [f"Command: `{report['command']}`", ""]
    if columns:
        out += [f"torch {torch.__version__}, {args.threads} thread(s), batch size {args.batch_size}, "
                f"limit {args.limit or 'none (full splits)'}, 0-shot; models: "
                + ", ".join(f"{label} = `{report[label]['name']}`" for label, _ in columns), "",
                accuracy_table(columns)]
    if not args.no_speed:
        if dense_model is None:
            dense_model = (load_model(DENSE), load_tokenizer(DENSE))
        rows = measure_throughput(*dense_model, args.tasks, args.speed_limit, args.batch_size, args.repeats)
        report["throughput"] = [dict(zip(("task", "docs", "requests", "shared_s", "naive_s", "max_abs_ll_diff"), row))
                                for row in rows]
        out += ["", f"Throughput on `{DENSE}` (first {args.speed_limit} docs per task, scoring only, "
                f"fastest of {args.repeats} alternating runs per mode):", "",
                throughput_table(rows)]
    report["wall_seconds"] = time.perf_counter() - started
    report["load_average"] = _load_average()
    out += ["", f"Total wall time: {report['wall_seconds'] / 60:.1f} min (load average at the end: "
            f"{report['load_average']})"]
    sys.stdout.write("\n".join(out) + "\n")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()

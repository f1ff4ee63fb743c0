"""Compact vs dense checkpoints of the bundled SmolLM2-135M: file sizes and peak memory while loading.

The model is pruned with magnitude (no calibration) at each sparsity, cast to bf16, and saved three times:
dense (``save_pretrained``, with the plan marker), compact (``save_compact``: values + bitmask / N:M indices)
and deflate (``save_compact(codec="deflate")``: those tensors also deflated by byte plane). Each checkpoint is
then loaded with ``AutoModelForCausalLM.from_pretrained`` in a fresh process (``optimum_msp`` imported in both
cases, so the imports cost the same) that reports, relative to its memory just before ``from_pretrained``: the peak RSS
while loading (``VmHWM``), the peak anonymous memory (sampled), the anonymous / file-backed RSS after loading,
and the RSS after one forward pass (every weight touched); and the load time. The parent checks that both loads
give identical tensors (``identical``).

    python bench/checkpoint_size.py                      # 50 % and 75 %, 5 loads each, table on stdout
    python bench/checkpoint_size.py --sparsities 0.5 --keep /tmp/ckpts
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, set_threads  # noqa: E402

COLUMNS = ["sparsity", "format", "weights_MB", "ratio", "pruned_layers_ratio", "load_peak_rss_MB",
           "load_peak_rss_range_MB",
           "load_peak_anon_MB", "after_load_anon_MB", "after_load_file_MB", "rss_after_forward_MB", "save_s",
           "load_s", "identical"]


def _memory_mb() -> dict:
    """Current RSS split into anonymous memory (heap, tensors) and file-backed pages (mmap'd files, libraries)."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) / 1024
    return values


class _Sampler(threading.Thread):
    """Polls /proc/self/status to find the peak anonymous memory (ru_maxrss only has the peak of the total)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_anon = 0.0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.peak_anon = max(self.peak_anon, _memory_mb()["RssAnon"])
            time.sleep(0.002)


def load_child(folder: str, threads: int) -> None:
    """Child process: load one checkpoint, print its memory numbers as JSON (with an exact digest of the weights)."""
    set_threads(threads)
    import torch
    from transformers import AutoModelForCausalLM

    import optimum_msp  # noqa: F401  (registers the loader for compact checkpoints)

    before = _memory_mb()
    sampler = _Sampler()
    sampler.start()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder)
    seconds = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    # VmHWM, the peak RSS of this process image. Not ru_maxrss: Linux carries the RSS of the forking parent
    # (which holds a pruned model here) into the child's ru_maxrss across exec.
    after_load = _memory_mb()
    peak = after_load["VmHWM"]
    with torch.no_grad():  # touches every weight: mmap-backed (dense) pages become resident too
        model(torch.zeros(1, 8, dtype=torch.long))
    steady = _memory_mb()
    # exact digest of every tensor; +0.0 folds a pruned -0.0 (dense file) and +0.0 (compact file) together
    digest = {k: hashlib.sha256((v.float() + 0.0).numpy().tobytes()).hexdigest() for k, v in model.state_dict().items()}
    print(json.dumps({
        "peak_rss_mb": peak - before["VmRSS"],
        "peak_anon_mb": max(sampler.peak_anon, after_load["RssAnon"]) - before["RssAnon"],
        "after_load_anon_mb": after_load["RssAnon"] - before["RssAnon"],
        "after_load_file_mb": after_load["RssFile"] - before["RssFile"],
        "steady_rss_mb": steady["VmRSS"] - before["VmRSS"], "load_s": seconds, "digest": digest,
        "dtype": str(model.dtype),
    }))


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _pruned_layer_bytes(folder: Path, layers) -> int:
    """Bytes of the tensors stored for the pruned layers (values, masks, indices, meta), header excluded."""
    from safetensors import safe_open

    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                if key.rsplit(".", 1)[0] in layers:
                    tensor = handle.get_slice(key)
                    size = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "I64": 8}[tensor.get_dtype()]
                    numel = 1
                    for dim in tensor.get_shape():
                        numel *= dim
                    total += numel * size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", default="0.5,0.75")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="loads per checkpoint (memory columns: median)")
    parser.add_argument("--keep", help="write the checkpoints here (default: a temporary folder, removed)")
    parser.add_argument("--load-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_child:
        return load_child(args.load_child, args.threads)

    set_threads(args.threads)
    import torch

    from optimum_msp import MSPConfig, MSPPruner, SparsityPlan
    from optimum_msp.checkpoint import save_compact, save_pruned
    from optimum_msp.modeling import resolve_model_path

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="msp-ckpt-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for sparsity in (float(s) for s in args.sparsities.split(",")):
            pruner = MSPPruner.from_pretrained(args.model)
            pruner.prune(MSPConfig(method="magnitude", sparsity=sparsity))
            model = pruner.model.to(torch.bfloat16)
            layers = set(SparsityPlan.from_config(model.config).layers)
            folders = {kind: root / f"s{sparsity}-{kind}" for kind in ("dense", "compact", "deflate")}
            save_seconds = {}
            for kind, folder in folders.items():
                started = time.perf_counter()
                if kind == "dense":
                    save_pruned(model, folder)
                else:
                    save_compact(model, folder, codec="deflate" if kind == "deflate" else None)
                save_seconds[kind] = time.perf_counter() - started
            del pruner, model
            results = {kind: [] for kind in folders}
            for _ in range(args.repeats):  # interleaved, so drifting load hits every format alike
                for kind, folder in folders.items():
                    out = subprocess.run(
                        [sys.executable, __file__, "--load-child", str(folder), "--threads", str(args.threads)],
                        capture_output=True, text=True, check=True,
                    )
                    results[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
            dense_bytes = _weights_bytes(folders["dense"])
            dense_layers = _pruned_layer_bytes(folders["dense"], layers)
            for kind, folder in folders.items():
                identical = all(run["digest"] == results["dense"][0]["digest"] for run in results[kind])
                r = {key: statistics.median(run[key] for run in results[kind]) for key in results[kind][0]
                     if isinstance(results[kind][0][key], (int, float))}
                peaks = [run["peak_rss_mb"] for run in results[kind]]
                rows.append({
                    "sparsity": sparsity, "format": kind, "weights_MB": _weights_bytes(folder) / 1e6,
                    "ratio": _weights_bytes(folder) / dense_bytes,
                    "pruned_layers_ratio": _pruned_layer_bytes(folder, layers) / dense_layers,
                    "load_peak_rss_MB": r["peak_rss_mb"], "load_peak_anon_MB": r["peak_anon_mb"],
                    "after_load_anon_MB": r["after_load_anon_mb"], "after_load_file_MB": r["after_load_file_mb"],
                    "rss_after_forward_MB": r["steady_rss_mb"], "save_s": save_seconds[kind], "load_s": r["load_s"],
                    "identical": identical, "load_peak_rss_range_MB": f"{min(peaks):.1f}-{max(peaks):.1f}",
                })
            print(markdown_table(rows[-3:], COLUMNS), file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"model: {resolve_model_path(args.model)} (bf16), magnitude pruning, threads={args.threads}")
    print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()

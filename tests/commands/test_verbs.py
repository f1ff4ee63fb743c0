"""Every verb of the command line run as a user runs it (a subprocess of ``python -m optimum_msp.commands.cli``) on a
tiny model: exit codes and what lands on disk; then one bad input per verb, which must exit 2 with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optimum_msp.commands.cli import main
from tiny_models import tiny_model, word_corpus, word_tokenizer

ROOT = Path(__file__).resolve().parents[2]
#: calibration on the corpus file in short windows: seconds, not minutes
CALIBRATION = ["--seqlen", "32", "--num-calibration-samples", "4"]


def cli(*args: str, env: dict = None, cwd: Path = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join([str(ROOT), environment.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "optimum_msp.commands.cli", *args], capture_output=True, text=True,
                          env=environment, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny model folder with a tokenizer, a calibration text, and two pruned folders of it: a Fisher plan (pruned
    by the ``prune`` command itself) and a uniform one."""
    from optimum_msp import MSPConfig, MSPPruner

    root = tmp_path_factory.mktemp("verbs")
    tiny = root / "tiny"
    tiny_model("llama").save_pretrained(tiny)
    word_tokenizer(adds_bos=False).save_pretrained(tiny)
    corpus = word_corpus(root / "corpus.txt")
    env = {"OPTIMUM_MSP_CACHE": str(root / "cache")}
    done = cli("prune", str(tiny), "--method", "wanda", "--sparsity", "0.6", "--allocation", "fisher",
               "--calibration-dataset", str(corpus), *CALIBRATION, "--eval-windows", "0", "-o", str(root / "fisher"),
               "--compare-with", "uniform", "owl",
               env=env)
    assert done.returncode == 0, done.stderr
    pruner = MSPPruner.from_pretrained(tiny)
    pruner.prune(MSPConfig(method="magnitude", sparsity=0.6))
    pruner.save_pretrained(root / "uniform")
    return {"root": root, "tiny": tiny, "corpus": corpus, "env": env, "fisher": root / "fisher",
            "uniform": root / "uniform"}


def test_prune_writes_report_md_with_uniform_and_owl_beside_the_plan(work):
    folder = work["fisher"]
    run = json.loads((folder / "report.json").read_text())
    plan = json.loads((folder / "config.json").read_text())["sparsity_plan"]
    assert set(run["comparison"]) == {"uniform", "owl"}  # --compare-with
    assert set(run["comparison"]["owl"]) == set(plan["layers"])
    assert set(run["comparison"]["uniform"].values()) == {0.6}
    text = (folder / "report.md").read_text()
    for heading in ("## Plan", "### Per decoder block", "## Settings", "## Run: timings and memory", "## Evaluation"):
        assert heading in text, heading
    assert "| block | layers | weights | fisher | uniform | owl | Fisher trace |" in text
    assert "| allocation_seconds |" in text and "| peak_rss_mb |" in text


def test_eval_prints_and_writes_json_and_keeps_partial_results_out_of_the_card(work, tmp_path):
    folder = tmp_path / "fisher"
    subprocess.run(["cp", "-r", str(work["fisher"]), str(folder)], check=True)
    card_before = (folder / "README.md").read_text()
    output = tmp_path / "out" / "results.json"
    done = cli("eval", str(folder), "--tasks", "wikitext2,arc_easy", "--limit", "2", "--seqlen", "32",
               "--output", str(output), env=work["env"])
    assert done.returncode == 0, done.stderr
    assert "wikitext2" in done.stdout and "arc_easy" in done.stdout and "acc_norm" in done.stdout
    record = json.loads(output.read_text())
    assert record["limit"] == 2
    assert record["results"]["wikitext2"]["windows"] == 2 and record["results"]["arc_easy"]["n"] == 2
    assert (folder / "README.md").read_text() == card_before
    # a partial number never goes into a card: --update-card with --limit is refused before any work
    refused = cli("eval", str(folder), "--tasks", "wikitext2", "--limit", "2", "--update-card", env=work["env"])
    assert refused.returncode == 2 and "whole-split results only" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_update_card_adds_whole_split_results_to_the_card_and_report(work, tmp_path):
    from huggingface_hub import ModelCard

    from optimum_msp.commands.evaluate import update_card
    from optimum_msp.integrations.model_card import perplexity_result

    folder = tmp_path / "fisher"
    subprocess.run(["cp", "-r", str(work["fisher"]), str(folder)], check=True)
    update_card(folder, [perplexity_result(123.25, seqlen=32, bos=False)])
    update_card(folder, [perplexity_result(99.5, seqlen=32, bos=False)])  # the same measurement: replaced
    results = ModelCard.load(folder / "README.md").data.eval_results
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in results] == [("wikitext", "perplexity", 99.5)]
    assert "99.5" in (folder / "report.md").read_text()


def test_sensitivity_writes_traces_per_layer_and_block(work, tmp_path):
    out = tmp_path / "sensitivity"
    done = cli("sensitivity", str(work["tiny"]), "--calibration-dataset", str(work["corpus"]), *CALIBRATION,
               "--fisher-samples", "2", "-o", str(out), env=work["env"])
    assert done.returncode == 0, done.stderr
    traces = json.loads((out / "sensitivity.json").read_text())
    assert len(traces["layers"]) == 21 and set(traces["blocks"]) == {"0", "1", "2"}
    block = sum(value for name, value in traces["layers"].items() if name.startswith("model.layers.1."))
    assert traces["blocks"]["1"] == pytest.approx(block)
    assert (traces["fisher_samples"], traces["fisher_seqlen"], traces["calibration"]["num_samples"]) == (2, 32, 4)
    from optimum_msp.plotting import plot_available

    if plot_available():
        assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_agrees_with_a_saved_checkpoint(work):
    done = cli("inspect", str(work["fisher"]))
    assert done.returncode == 0, done.stderr
    assert "OK: 21 layers match the plan" in done.stdout
    assert "model.layers.2.mlp.down_proj" in done.stdout


def test_inspect_fails_on_a_checkpoint_with_one_tampered_weight_file(work, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "tampered"
    subprocess.run(["cp", "-r", str(work["fisher"]), str(folder)], check=True)
    tensors = load_file(folder / "model.safetensors")
    layer = "model.layers.1.mlp.up_proj"
    tensors[f"{layer}.weight"] = torch.randn_like(tensors[f"{layer}.weight"])  # dense again
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    done = cli("inspect", str(folder))
    assert done.returncode == 1
    reason = [line for line in done.stderr.splitlines() if line.startswith("optimum-msp inspect:")]
    assert len(reason) == 1 and layer in reason[0] and "Traceback" not in done.stderr


def test_compare_lists_the_differing_layers_largest_first(work):
    from optimum_msp.report import read_plan

    done = cli("compare", str(work["uniform"]), str(work["fisher"]))
    assert done.returncode == 0, done.stderr
    fisher, uniform = read_plan(work["fisher"]), read_plan(work["uniform"])
    spreads = {name: abs(layer.target.sparsity - uniform.layers[name].target.sparsity)
               for name, layer in fisher.layers.items()}
    differing = [name for name, spread in spreads.items() if spread > 1e-9]
    assert f"{len(differing)} of 21 layers differ" in done.stdout
    listed = done.stdout.split("layers differ")[1].splitlines()
    first = next(line.split()[0] for line in listed if line.startswith("model."))
    assert spreads[first] == max(spreads.values())
    assert "allocation" in done.stdout and "fisher" in done.stdout and "uniform" in done.stdout


def test_push_uploads_a_compact_copy_as_one_commit(work, fake_hub):
    done = cli("push", str(work["fisher"]), "tester/tiny-fisher", "--compact", "deflate", "--private",
               env={"HF_TOKEN": fake_hub.token})
    assert done.returncode == 0, done.stderr
    assert fake_hub.commit_titles("tester/tiny-fisher")[0].startswith("Upload wanda/fisher pruned model")
    files = fake_hub.repo_files("tester/tiny-fisher")
    assert {"model.safetensors", "config.json", "README.md", "report.md", "tokenizer.json"} <= set(files)
    assert json.loads(files["config.json"])["quantization_config"]["checkpoint_format"] == "compact"
    assert files["report.md"] == (work["fisher"] / "report.md").read_bytes()


# ------------------------------------------------------------------------------------------------- bad input
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("optimum-msp")]
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err
    return errors[0]


@pytest.mark.parametrize("verb", ["prune", "eval", "sensitivity", "inspect", "compare", "push", "estimate"])
def test_bad_input_exits_2_with_one_line(verb, work):
    """Run as a user runs it (a subprocess): exit status 2 and one line on stderr saying what to change."""
    args, says = {
        "prune": (["prune", str(work["tiny"]), "--sparsity", "1.5"], "sparsity"),
        "eval": (["eval", str(work["tiny"]), "--tasks", "wikitext3"], "unknown task(s) wikitext3"),
        "sensitivity": (["sensitivity", str(work["tiny"]), "-o", str(work["fisher"])], str(work["fisher"])),
        "inspect": (["inspect", str(work["tiny"])], "holds no sparsity plan"),
        "compare": (["compare", str(work["fisher"]), str(work["root"] / "missing")], "is not a folder"),
        "push": (["push", str(work["fisher"]), "no-namespace"], "REPO_ID must read org/name"),
        "estimate": (["estimate", str(work["tiny"]), "--max-memory", "cpu=lots"], "cpu=lots"),
    }[verb]
    done = cli(*args, env=work["env"])
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert says in lines[0]


def test_eval_update_card_needs_a_pruned_folder(work, capsys):
    assert main(["eval", str(work["tiny"]), "--update-card"]) == 2
    assert "--update-card needs a folder saved by optimum-msp" in _one_line_error(capsys)


def test_eval_lm_eval_backend_says_what_to_install_when_missing(work, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum_msp.evaluation.lm_eval", None)  # import fails as if absent
    assert main(["eval", str(work["fisher"]), "--backend", "lm-eval", "--tasks", "arc_easy"]) == 2
    assert 'pip install "optimum-msp[lm-eval]"' in _one_line_error(capsys)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # lm-evaluation-harness not installed
    assert main(["eval", str(work["fisher"]), "--backend", "lm-eval", "--tasks", "arc_easy"]) == 2
    assert 'pip install "optimum-msp[lm-eval]"' in _one_line_error(capsys)

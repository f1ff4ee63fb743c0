import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optimum_msp import MSPConfig, MSPPruner, SparsityPlan
from optimum_msp.commands.cli import main
from tiny_models import tiny_model


@pytest.mark.parametrize("compact", ["none", "deflate"])
def test_prune_command_saves_a_verified_checkpoint(tmp_path, capsys, compact):
    source = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(source)
    out = tmp_path / "pruned"
    code = main(["prune", str(source), "--method", "magnitude", "--pattern", "2:4", "--eval-windows", "0",
                 "-o", str(out), "--compact", compact])
    assert code == 0
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert any(key.endswith("_msp_zsizes") for key in handle.keys()) == (compact == "deflate")
    result = json.loads(capsys.readouterr().out)
    assert result["achieved_sparsity"] == pytest.approx(0.5)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert SparsityPlan.from_config(model.config).verify(model).nm_compliant


def test_whole_split_perplexity_goes_into_the_model_card(tmp_path, capsys, monkeypatch):
    import optimum_msp.evaluation as evaluation
    from huggingface_hub import ModelCard

    source = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(source)
    monkeypatch.setattr(evaluation, "perplexity", lambda *args, **kwargs: 12.5)  # no tokenizer/data needed
    for windows, folder in (("-1", "whole"), ("16", "partial")):
        assert main(["prune", str(source), "--method", "magnitude", "--sparsity", "0.5", "--eval-windows", windows,
                     "-o", str(tmp_path / folder)]) == 0
    capsys.readouterr()
    results = ModelCard.load(tmp_path / "whole" / "README.md").data.eval_results
    assert [(r.metric_type, r.metric_value) for r in results] == [("perplexity", 12.5)]
    assert ModelCard.load(tmp_path / "partial" / "README.md").data.eval_results is None
    # the partial-window number is kept, in the folder's run report
    report = json.loads((tmp_path / "partial" / "report.json").read_text())
    assert report["evaluation"] == {"wikitext2_test_ppl": 12.5, "windows": 16, "seqlen": 2048, "bos": False}


def test_bad_input_exits_with_a_message(tmp_path, capsys):
    assert main(["prune", str(tmp_path), "--pattern", "5:4"]) == 2
    assert "0 <= N <= M" in capsys.readouterr().err


def optimum_cli(*args, cwd=None):
    """``optimum-cli ARGS`` in a subprocess, with Optimum's register namespace cut to this checkout's own folder: a
    development checkout on PYTHONPATH beside an installed copy would otherwise register ``msp`` twice."""
    root = Path(__file__).resolve().parents[2]
    code = ("import sys; from pathlib import Path; import optimum.commands.register as register; "
            f"mine = [p for p in register.__path__ if Path(p).resolve().is_relative_to({str(root)!r})]; "
            "register.__path__._path[:] = mine or list(register.__path__); "
            "from optimum.commands import optimum_cli; sys.argv = ['optimum-cli', *sys.argv[1:]]; optimum_cli.main()")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=environment,
                          cwd=cwd)


def test_optimum_cli_registers_msp_and_runs_its_verbs(tmp_path):
    result = optimum_cli("msp", "--help")
    assert result.returncode == 0, result.stderr
    for verb in ("prune", "eval", "sensitivity", "inspect", "compare", "push", "estimate", "perplexity"):
        assert verb in result.stdout, verb
    # a verb runs (optimum-cli calls .run() on what args.func returns) and exits with its status, errors on one line
    pruner = MSPPruner(tiny_model("llama"))
    pruner.prune(MSPConfig(method="magnitude", sparsity=0.5))
    pruner.save_pretrained(tmp_path / "a", plot=False)
    result = optimum_cli("msp", "compare", str(tmp_path / "a"), str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    assert "the plans give all 21 layers the same targets" in result.stdout
    result = optimum_cli("msp", "compare", str(tmp_path / "a"))
    assert result.returncode == 2 and "needs at least two folders" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_file_and_flags_build_the_config(tmp_path):
    from optimum_msp import MSPConfig
    from optimum_msp.commands.arguments import config_from_args as _config_from_args
    from optimum_msp.commands.cli import build_parser

    MSPConfig(method="sparsegpt", sparsity=0.7, allocation="msp", generations=3, ignore=["re:.*down_proj"],
              fitness="kl").save_pretrained(tmp_path)

    def config(*flags):
        return _config_from_args(build_parser().parse_args(["prune", "--config", str(tmp_path), *flags]))

    from_file = config()
    assert (from_file.method, from_file.sparsity, from_file.generations, from_file.ignore, from_file.fitness) == (
        "sparsegpt", 0.7, 3, ["re:.*down_proj"], "kl")
    overridden = config("--sparsity", "0.8", "--search-cache-mb", "256", "--targets", "q_proj", "re:.*up_proj",
                        "--search-checkpoint", str(tmp_path / "search.json"))
    assert overridden.sparsity == 0.8 and overridden.search_cache_mb == 256
    assert overridden.targets == ["q_proj", "re:.*up_proj"] and overridden.search_checkpoint.endswith("search.json")
    assert overridden.method == "sparsegpt" and overridden.generations == 3  # the file's, where no flag says
    # an N:M flag brings its own sparsity instead of contradicting the file's 70 %
    nm = config("--pattern", "2:8").resolved()
    assert (nm.pattern, nm.m, nm.sparsity) == ("mixed-n:m", 8, 0.75)
    # without a file, flags alone over MSPConfig's defaults
    plain = _config_from_args(build_parser().parse_args(["prune", "--fitness", "kl"]))
    assert plain.to_dict() == MSPConfig(fitness="kl").to_dict()


def test_preset_sits_between_the_config_file_and_the_flags(tmp_path):
    from optimum_msp import MSPConfig
    from optimum_msp.commands.arguments import config_from_args as _config_from_args
    from optimum_msp.commands.cli import build_parser
    from optimum_msp.presets import PRESETS

    MSPConfig(method="sparsegpt", allocation="msp", generations=3, fitness_samples=3).save_pretrained(tmp_path)

    def config(*flags):
        return _config_from_args(build_parser().parse_args(["prune", *flags]))

    quality = config("--preset", "quality", "--allocation", "msp")
    assert quality.to_dict() == MSPConfig(**PRESETS["quality"], allocation="msp").to_dict()
    assert quality.to_dict() != MSPConfig(allocation="msp").to_dict()
    over_file = config("--config", str(tmp_path), "--preset", "quality")  # the preset over the file's value
    assert over_file.fitness_samples == PRESETS["quality"]["fitness_samples"] and over_file.generations == 3
    flag_wins = config("--config", str(tmp_path), "--preset", "quality", "--fitness-samples", "5")
    assert flag_wins.fitness_samples == 5 and flag_wins.method == "sparsegpt"
    with pytest.raises(SystemExit):  # argparse names the choices
        config("--preset", "qualty")


def test_bad_config_file_exits_with_a_message(tmp_path, capsys):
    (tmp_path / "msp_config.json").write_text('{"method": "wanda", "spasity": 0.5}')
    assert main(["prune", str(tmp_path), "--config", str(tmp_path)]) == 2
    assert "Unknown MSPConfig keys ['spasity']" in capsys.readouterr().err


def test_output_is_checked_before_pruning(tmp_path, capsys, monkeypatch):
    import optimum_msp.pruner as pruner_module

    source = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(source)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    pruned = []
    monkeypatch.setattr(pruner_module.MSPPruner, "prune", lambda self, config: pruned.append(config))
    for extra in ([], ["--overwrite"]):  # not a checkpoint of ours: refused even with --overwrite
        assert main(["prune", str(source), "--method", "magnitude", "--eval-windows", "0", "-o", str(mine),
                     *extra]) == 2
        assert str(mine) in capsys.readouterr().err
    assert pruned == [] and [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_overwrite_replaces_a_previous_checkpoint(tmp_path, capsys):
    source = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(source)
    out = tmp_path / "pruned"
    args = ["prune", str(source), "--method", "magnitude", "--eval-windows", "0", "-o", str(out)]
    assert main(args + ["--sparsity", "0.5"]) == 0
    assert main(args + ["--sparsity", "0.6"]) == 2  # exists: not replaced without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--sparsity", "0.6", "--overwrite"]) == 0
    plan = SparsityPlan.from_dict(json.loads((out / "config.json").read_text())["sparsity_plan"])
    assert plan.target_sparsity == 0.6


def test_prune_without_output_says_the_result_is_discarded(tmp_path, caplog):
    source = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(source)
    assert main(["prune", str(source), "--method", "magnitude", "--eval-windows", "0"]) == 0
    assert "discarded" in caplog.text


def test_bare_command_and_version(capsys):
    assert main([]) == 2
    assert "prune" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and "optimum-msp" in capsys.readouterr().out


def test_help_shows_every_config_field_with_its_default(capsys):
    from optimum_msp.configuration import config_fields

    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    for name in config_fields():
        assert "--" + name.replace("_", "-") in text, name
    assert "(default: 0.01)" in text  # SparseGPT's dampening, declared with its method


def test_prune_compares_with_uniform_and_with_owl_for_msp_wanda_unless_told(tmp_path, monkeypatch, capsys):
    import optimum_msp.pruner as pruner_module

    asked = []
    monkeypatch.setattr(pruner_module.MSPPruner, "prune",
                        lambda self, config, compare_with=(): asked.append(tuple(compare_with)))
    monkeypatch.setattr(pruner_module.MSPPruner, "from_pretrained", classmethod(lambda cls, *a, **k: cls(None)))
    # OWL by default only where it is free: after an MSP-Wanda search, which cached the dense input norms
    for flags in (["--allocation", "msp"], ["--allocation", "msp", "--method", "sparsegpt"],
                  ["--allocation", "fisher"], ["--allocation", "fisher", "--compare-with", "owl"],
                  ["--allocation", "msp", "--compare-with"]):
        main(["prune", "--eval-windows", "0", "--method", "wanda", *flags])
    assert asked == [("uniform", "owl"), ("uniform",), ("uniform",), ("owl",), ()]
    # a typo is refused before any model is loaded
    assert main(["prune", "--compare-with", "owls"]) == 2
    assert "Unknown allocation 'owls'" in capsys.readouterr().err and len(asked) == 5

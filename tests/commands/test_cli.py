import json
import subprocess
import sys

import pytest

from optimum_msp import SparsityPlan
from optimum_msp.commands.cli import main
from tiny_models import tiny_model


def test_prune_command_saves_a_verified_checkpoint(tmp_path, capsys):
    source = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(source)
    out = tmp_path / "pruned"
    code = main(["prune", str(source), "--method", "magnitude", "--pattern", "2:4", "--eval-windows", "0",
                 "-o", str(out)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["achieved_sparsity"] == pytest.approx(0.5)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert SparsityPlan.from_config(model.config).verify(model).nm_compliant


def test_bad_input_exits_with_a_message(tmp_path, capsys):
    assert main(["prune", str(tmp_path), "--pattern", "5:4"]) == 2
    assert "0 <= N <= M" in capsys.readouterr().err


def test_optimum_cli_registers_msp():
    result = subprocess.run([sys.executable, "-m", "optimum.commands.optimum_cli", "msp", "--help"],
                            capture_output=True, text=True)
    if result.returncode != 0:  # optimum's module entry point differs: fall back to the console script
        result = subprocess.run(["optimum-cli", "msp", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "prune" in result.stdout and "perplexity" in result.stdout

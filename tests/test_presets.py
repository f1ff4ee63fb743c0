import argparse

import pytest

from optimum_msp import MSPConfig
from optimum_msp.commands.arguments import add_config_arguments, config_from_args
from optimum_msp.presets import PRESETS, preset_values


def test_a_preset_sets_defaults_and_explicit_values_win():
    values = preset_values("quality")
    assert values, "the quality preset must change something"
    config = MSPConfig.from_preset("quality", method="sparsegpt", generations=3)
    for name, value in values.items():
        expected = 3 if name == "generations" else value
        assert getattr(config, name) == expected, name
    assert config.method == "sparsegpt"
    assert MSPConfig.from_preset("default") == MSPConfig()


def test_every_preset_is_a_valid_config():
    for name in PRESETS:
        MSPConfig.from_preset(name, allocation="msp").validate()


def test_an_unknown_preset_is_named_with_the_choices():
    with pytest.raises(ValueError, match="Unknown preset 'fastest'.*quality"):
        MSPConfig.from_preset("fastest")


def test_the_command_line_preset_is_overridden_by_flags_and_by_the_callers_defaults():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--preset", "quality", "--generations", "5", "--allocation", "msp"])
    config = config_from_args(args, defaults={"offspring": 10})
    assert config.generations == 5 and config.offspring == 10
    assert config.fitness_samples == preset_values("quality")["fitness_samples"]
    assert config_from_args(parser.parse_args([])) == MSPConfig()

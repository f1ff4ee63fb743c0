import json

import pytest

from optimum_msp import MSPConfig


def test_nm_pattern_derives_sparsity():
    config = MSPConfig(method="wanda", pattern="2:4")
    assert config.sparsity == 0.5 and config.nm == (2, 4) and config.m == 4
    assert MSPConfig(pattern="2:8").sparsity == 0.75
    resolved = config.resolved()
    assert resolved == config and resolved.resolved() == resolved


def test_nm_with_uniform_allocation_stays_fixed():
    config = MSPConfig(pattern="2:8", allocation="uniform")
    assert config.resolved().pattern == "2:8"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pattern="5:4"), "0 <= N <= M"),
        (dict(pattern="2:0"), "M must be >= 1"),
        (dict(pattern="2:-4"), "M must be >= 1"),
        (dict(sparsity=1.0), r"\[0, 1\)"),
        (dict(sparsity=-0.1), r"\[0, 1\)"),
        (dict(sparsity=1.5), r"\[0, 1\)"),
        (dict(method="obs"), "Unknown method 'obs'"),
        (dict(allocation="random"), "Unknown allocation 'random'"),
        (dict(pattern="blocks"), "Unknown pattern"),
        (dict(pattern="2:4", sparsity=0.6), "drop sparsity"),
        (dict(num_calibration_samples=0), "positive integer"),
        (dict(m=4), "only meaningful"),
    ],
)
def test_bad_input_is_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MSPConfig(**kwargs)


def test_round_trip_and_unknown_keys(tmp_path):
    config = MSPConfig(method="sparsegpt", sparsity=0.6, targets=["re:.*mlp.*"], ignore=["down_proj"], seed=3)
    config.save_pretrained(tmp_path)
    again = MSPConfig.from_pretrained(tmp_path)
    assert again == config
    data = json.loads((tmp_path / "msp_config.json").read_text())
    data["sparsityy"] = 0.5
    with pytest.raises(ValueError, match="Unknown MSPConfig keys"):
        MSPConfig.from_dict(data)


def test_from_dict_validates_kwargs():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MSPConfig.from_dict({"method": "wanda"}, sparsity=2.0)


def test_a_new_method_is_one_registration_with_its_options(tmp_path):
    """A pruner registered with its option class is configurable by MSPConfig and the CLI, validated by its class."""
    from dataclasses import dataclass

    from optimum_msp.commands.arguments import add_config_arguments, config_from_args
    from optimum_msp.options import Options, option
    from optimum_msp.pruners import PRUNERS, ScorePruner

    @dataclass
    class StrengthOptions(Options):
        strength: float = option(1.0, "exponent of |W| in the score", kind=float, low=0.0)

    @PRUNERS.register("test-power", options=StrengthOptions)
    class PowerPruner(ScorePruner):
        needs_calibration = False

        def scores(self, weight, stats):
            return weight.abs() ** self.options.strength

    try:
        config = MSPConfig(method="test-power", strength=2.0, sparsity=0.5)
        assert config.pruner_options() == StrengthOptions(strength=2.0)
        assert config.to_dict()["strength"] == 2.0 and "strength" not in MSPConfig(method="wanda").to_dict()
        with pytest.raises(ValueError, match=r"strength must lie in \[0, inf\)"):
            MSPConfig(method="test-power", strength=-1.0)
        import argparse

        parser = argparse.ArgumentParser()
        add_config_arguments(parser)
        args = parser.parse_args(["--method", "test-power", "--strength", "3"])
        assert config_from_args(args).pruner_options().strength == 3.0
    finally:
        PRUNERS._entries.pop("test-power")


def test_values_are_checked_where_they_are_declared():
    for kwargs, message in [
        (dict(dampening="0.01"), "dampening must be a finite number"),
        (dict(method=["wanda"]), "method must be a string"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(owl_threshold=float("nan")), "owl_threshold must be a finite number"),
        (dict(population_size=1), "population_size must lie in"),
        (dict(targets=[1]), "targets must be a list of str"),
    ]:
        with pytest.raises(ValueError, match=message):
            MSPConfig(**kwargs)


def test_validation_changes_nothing_the_user_asked():
    config = MSPConfig(pattern="2:8", allocation="fisher", targets="q_proj")
    before = dict(vars(config))
    config.validate()
    config.resolved()
    assert vars(config) == before and config.pattern == "2:8"


def test_a_preset_fills_values_and_what_is_given_wins():
    from optimum_msp.presets import PRESETS

    assert MSPConfig.from_preset("default") == MSPConfig()
    quality = MSPConfig.from_preset("quality", method="sparsegpt", sparsity=0.75, allocation="msp")
    assert PRESETS["quality"] and all(getattr(quality, name) == value for name, value in PRESETS["quality"].items())
    assert quality != MSPConfig(method="sparsegpt", sparsity=0.75, allocation="msp")
    given = next(iter(PRESETS["quality"]))
    assert getattr(MSPConfig.from_preset("quality", **{given: 3}), given) == 3
    with pytest.raises(ValueError, match=r"Unknown preset 'qualty'.*'quality'"):
        MSPConfig.from_preset("qualty")


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "mixed-n:m"])
def test_every_preset_is_a_valid_config_for_every_method(method, pattern):
    from optimum_msp.presets import PRESETS

    for name in PRESETS:
        MSPConfig.from_preset(name, method=method, pattern=pattern, sparsity=0.625, allocation="msp").validate()

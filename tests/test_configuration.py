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

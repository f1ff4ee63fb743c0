"""The seed-spread logic of bench/allocation.py (a script, not part of the package): which rows are seeds of one
experiment, and when MSP counts as a gain over its Fisher seed."""

import argparse
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("allocation")
    finally:
        sys.path.remove(str(BENCH))


def _row(allocation, seed, ppl, method="wanda", target="0.75", **extra):
    overrides = {"seed": seed, **extra.pop("overrides", {})}
    return {"method": method, "target": target, "allocation": allocation, "seed": seed, "ppl": ppl,
            "eval_windows": 16, "overrides": overrides, **extra}


def test_seed_list(bench):
    assert bench.seed_list("0,1,2") == [0, 1, 2]
    for bad in ("0,x", "1,1", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="--seeds"):
            bench.seed_list(bad)


@pytest.mark.parametrize("fisher, msp, verdict", [
    ({0: 100, 1: 104, 2: 102}, {0: 90, 1: 93, 2: 91}, "gain"),           # 11 better, spreads 4 and 3
    ({0: 100, 1: 104, 2: 102}, {0: 97, 1: 99, 2: 100}, "within spread"),  # 3.3 better, spread 4
    ({0: 100, 1: 101, 2: 102}, {0: 95, 1: 99, 2: 103}, "within spread"),  # 2 better, but MSP's own spread is 8
    ({0: 90, 1: 93, 2: 91}, {0: 100, 1: 104, 2: 102}, "loss"),
    ({0: 100, 1: 104}, {0: 50}, "-"),                                    # one common seed: no spread to judge by
    ({0: 100, 1: 104, 5: 300}, {0: 90, 1: 93, 2: 10}, "gain"),          # only the seeds both ran are compared
])
def test_msp_counts_as_a_gain_only_beyond_the_seed_spread(bench, fisher, msp, verdict):
    assert bench.msp_verdict(fisher, msp) == verdict


def test_seed_cells_group_seeds_of_one_experiment(bench):
    rows = [
        _row("fisher", 0, 100.0), _row("fisher", 1, 104.0),
        _row("msp", 0, 95.0), _row("msp", 0, 91.0),  # a re-run of seed 0 replaces the earlier row
        _row("msp", 1, 93.0, overrides={"search_cache_mb": 0}),  # memory only: the same experiment
        _row("msp", 0, 50.0, overrides={"generations": 1}),  # another budget: another cell
        _row("fisher", 2, 103.0, ppl_16=102.0, eval_windows="all (148)"),  # a full-split row counts by its 16 windows
        {"method": "wanda", "pattern": "0.75", "ppl": 1.0},  # a baselines.py row: no allocation, left out
    ]
    cells = bench.seed_cells(rows)
    assert len(cells) == 2
    default = next(v for k, v in cells.items() if "generations" not in k[2])
    assert default == {"fisher": {0: 100.0, 1: 104.0, 2: 102.0}, "msp": {0: 91.0, 1: 93.0}}
    other = next(v for k, v in cells.items() if "generations" in k[2])
    assert other == {"msp": {0: 50.0}}


def test_seed_table_prints_mean_range_and_verdict(bench):
    rows = [_row(a, s, p) for a, values in (("uniform", (300, 320, 310)), ("fisher", (100, 104, 102)),
                                            ("msp", (90, 93, 91))) for s, p in enumerate(values)]
    table = bench.seed_table(rows)
    line = next(line for line in table.splitlines() if line.startswith("| wanda"))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[3] == "0,1,2"
    assert cells[4] == "310 (300–320)"  # uniform: mean (min–max)
    assert cells[5] == "-"  # no OWL rows
    assert cells[6:8] == ["102 (100–104)", "91.33 (90–93)"]
    assert cells[-1] == "gain" and cells[-2] == "4"  # spread: the larger max - min


def test_without_flags_drops_a_flag_and_its_values():
    sys.path.insert(0, str(BENCH))
    try:
        from common import without_flags
    finally:
        sys.path.remove(str(BENCH))
    argv = ["--threads", "1", "--seeds", "0,1", "--rows", "a", "b", "--generations", "2", "--seeds=3"]
    assert without_flags(argv, ("--rows", "--seeds")) == ["--threads", "1", "--generations", "2"]


def test_final_statistics_cells_unstructured_and_mixed(bench):
    final_statistics = importlib.import_module("final_statistics")  # bench/ is on the path through the fixture
    assert final_statistics.parse_cell("sparsegpt:0.7") == ("sparsegpt", {"sparsity": 0.7})
    assert final_statistics.parse_cell("wanda:3:8") == ("wanda", {"pattern": "mixed-n:m", "m": 8, "sparsity": 0.625})
    for bad in ("wanda", "wanda:x", "wanda:3:8:1"):
        with pytest.raises(ValueError, match="--cell"):
            final_statistics.parse_cell(bad)


def test_seeds_won_counts_the_common_seeds_where_msp_is_lower(bench):
    assert bench.seeds_won({0: 100, 1: 104, 2: 102}, {0: 90, 1: 105, 2: 101}) == "2/3"
    assert bench.seeds_won({0: 100, 1: 104}, {1: 103, 2: 1}) == "1/1"  # seed 2 has no Fisher row
    assert bench.seeds_won({0: 100}, {1: 90}) == "-"


def test_final_statistics_seeds_table_presets(bench, tmp_path):
    final_statistics = importlib.import_module("final_statistics")
    path = tmp_path / "rows.jsonl"
    rows = [{"cell": "sparsegpt:2:8", "seed": seed, "preset": preset, "plan": plan, "final_statistics": final,
             "ppl": ppl, "search_cpu_s": 300.0}
            for seed in (0, 1, 2)
            for preset, plan, final, ppl in (("short", "fisher", "sequential", 100 + seed),
                                             ("short", "msp", "search", 80 + seed),
                                             ("long", "msp", "search", 120 + seed))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    everything = final_statistics.seeds_table(path)
    assert "| sparsegpt:2:8 | short |" in everything and "| sparsegpt:2:8 | long |" in everything
    only_long = final_statistics.seeds_table(path, ["long"])
    assert "| sparsegpt:2:8 | short |" not in only_long
    # a preset without Fisher rows of its own is judged against another preset's Fisher models: 121 / 101, a loss
    assert "| sparsegpt:2:8 | long | 0,1,2 |" in only_long and "1.20x | loss | 0/3 |" in only_long


def test_final_statistics_compare_table_one_row_per_cell(bench, tmp_path):
    final_statistics = importlib.import_module("final_statistics")
    path = tmp_path / "rows.jsonl"
    rows = [{"cell": "wanda:2:8", "seed": seed, "preset": preset, "plan": plan, "final_statistics": final,
             "ppl": ppl, "search_cpu_s": 300.0 + seed}
            for seed in (0, 1, 2)
            for preset, plan, final, ppl in (("short", "fisher", "sequential", 100 + seed),
                                             ("short", "msp", "search", 120 + seed),
                                             ("long", "msp", "search", 50 + seed),
                                             ("other", "msp", "search", 1.0))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    table = final_statistics.compare_table(path, ["short", "long"]).splitlines()
    assert len(table) == 3 and "other" not in table[0]  # header, rule, one cell
    # Fisher 101 (100-102); short: 121, a loss on every seed; long: 51, a gain on every seed; CPU 301 s each;
    # per-seed ratios 120/100 .. 122/102 and 50/100 .. 52/102
    assert table[2] == ("| wanda:2:8 | 0,1,2 | 101 (100–102) | 121 (120–122) | 1.20x (1.20–1.20) | loss | 0/3 | "
                        "301 | 51 (50–52) | 0.50x (0.50–0.51) | gain | 3/3 | 301 |")


def test_final_statistics_paired_compare_keeps_the_seeds_every_preset_ran(bench, tmp_path):
    final_statistics = importlib.import_module("final_statistics")
    path = tmp_path / "rows.jsonl"
    rows = [{"cell": "wanda:3:8", "seed": seed, "preset": "long", "plan": plan, "final_statistics": final,
             "ppl": ppl + seed, "search_cpu_s": 400.0}
            for seed in (0, 1, 2) for plan, final, ppl in (("fisher", "sequential", 100), ("msp", "search", 80))]
    rows += [{"cell": "wanda:3:8", "seed": seed, "preset": "long-x2", "plan": "msp", "final_statistics": "search",
              "ppl": 60.0 + seed, "search_cpu_s": 800.0} for seed in (0, 1)]
    rows += [{"cell": "wanda:0.75", "seed": 2, "preset": "long-x2", "plan": "msp", "final_statistics": "search",
              "ppl": 1.0, "search_cpu_s": 800.0}]  # no long row on seed 2 of this cell: nothing to pair
    # a whole-split run of a seed already measured: the tables show its 16-window PPL, not the whole split's
    rows += [{"cell": "wanda:3:8", "seed": 0, "preset": "long", "plan": "msp", "final_statistics": "search",
              "ppl": 999.0, "ppl_16": 80.0, "eval_windows": "all (148)", "search_cpu_s": 400.0}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    table = final_statistics.compare_table(path, ["long", "long-x2"], paired=True).splitlines()
    assert table[0].endswith("| long-x2 / long |") and len(table) == 3
    # seeds 0 and 1 only: Fisher 100.5, long 80.5, long-x2 60.5; per seed 60/80 and 61/81
    assert table[2] == ("| wanda:3:8 | 0,1 | 100.5 (100–101) | 80.5 (80–81) | 0.80x (0.80–0.80) | gain | "
                        "2/2 | 400 | 60.5 (60–61) | 0.60x (0.60–0.60) | gain | 2/2 | 800 | 0.75x (0.75–0.75) |")
    unpaired = final_statistics.compare_table(path, ["long", "long-x2"]).splitlines()
    assert "| wanda:3:8 | 0,1,2 |" in unpaired[-1] and not unpaired[0].endswith("/ long |")


def test_bench_long_x2_rows_are_the_library_quality_preset(bench):
    """The docs quote the long-x2 rows as what the quality preset buys: they must be the same settings."""
    from optimum_msp import MSPConfig

    final_statistics = importlib.import_module("final_statistics")
    run = dict(method="sparsegpt", sparsity=0.75, allocation="msp")
    assert MSPConfig(**final_statistics.PRESETS["long-x2"], **run) == MSPConfig.from_preset("quality", **run)
    assert MSPConfig(**final_statistics.PRESETS["long"], **run) == MSPConfig(**run)  # and long is the default


def test_fitness_on_test_needs_the_evaluation_window_length(bench):
    """--fitness-on-test scores the search on evaluation windows, so its windows must be the evaluation's length."""
    from optimum_msp import MSPConfig

    final_statistics = importlib.import_module("final_statistics")
    config = MSPConfig(**final_statistics.PRESETS["long"], method="wanda", sparsity=0.75, allocation="msp")
    with pytest.raises(ValueError, match="fitness_seqlen is 512"):
        final_statistics.oracle_fitness_ids(config, tokenizer=None)


def test_fitness_on_test_windows_are_the_evaluations_first_and_reported_apart(bench, smollm2_path):
    """The oracle's fitness windows are the first windows the evaluation reads, and ppl_first_N is those windows' PPL
    from the same pass (a tiny model with SmolLM2's vocabulary; two 2048-token windows)."""
    from transformers import AutoTokenizer

    from optimum_msp import MSPConfig
    from optimum_msp.data import evaluation_windows
    from optimum_msp.evaluation import evaluation_ids
    from tiny_models import tiny_model

    final_statistics, common = importlib.import_module("final_statistics"), importlib.import_module("common")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    config = MSPConfig(**final_statistics.PRESETS["oracle"], method="wanda", sparsity=0.75, allocation="msp")
    windows = final_statistics.oracle_fitness_ids(config, tokenizer)
    evaluated = evaluation_windows(evaluation_ids(tokenizer, "wikitext2", "test"), 2048, 16)
    assert windows.shape == (2, 2048) and torch.equal(windows, evaluated[:2])

    model = tiny_model("llama", vocab_size=tokenizer.vocab_size + len(tokenizer.get_added_vocab()))
    both = common.wikitext_perplexity(model, tokenizer, 2, prefix=1)
    first = common.wikitext_perplexity(model, tokenizer, 1)
    assert both["ppl_first_1"] == pytest.approx(first["ppl"], rel=1e-5) and both["ppl_first_1"] != both["ppl"]


def test_fitness_on_test_rows_split_into_the_fitness_windows_and_the_others(bench):
    """Per-window NLLs 1, 2, 3, 4, the search scored on the first: PPL e^1 on it, e^3 on the other three."""
    import math

    final_statistics = importlib.import_module("final_statistics")
    row = {"ppl": math.exp(2.5), "ppl_first_1": math.exp(1.0), "eval_windows": 4, "fitness_on_test": 1}
    split = final_statistics.split_at_fitness_windows(row)
    assert split["ppl_fitness_windows"] == pytest.approx(math.e)
    assert split["ppl_other_windows"] == pytest.approx(math.exp(3.0))
    plain = {"ppl": 5.0, "eval_windows": 16}
    assert final_statistics.split_at_fitness_windows(plain) == plain

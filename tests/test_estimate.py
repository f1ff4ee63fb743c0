import re
from pathlib import Path

import pytest

from optimum_msp.commands.cli import main
from optimum_msp.estimate import (GIB, ModelShape, compact_bytes_per_weight, estimate_memory, parse_max_memory,
                                  visited_levels)
from tiny_models import tiny_config

# public config.json values (meta-llama/Llama-2-7b-hf, Llama-2-70b-hf); no download
LLAMA2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
                 torch_dtype="float16")
LLAMA2_70B = dict(LLAMA2_7B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8)
LLAMA_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
                dtype="bfloat16")


def test_weights_sit_where_the_placement_puts_them():
    on_gpu = estimate_memory(LLAMA2_7B, device="cuda", weights="device")
    assert on_gpu.base["device"]["weights"] == pytest.approx(6.74e9 * 2, rel=0.01)  # 6.74B fp16 weights
    assert "weights" not in on_gpu.base["host"]
    on_host = estimate_memory(LLAMA2_7B, device="cuda", weights="host")
    assert on_host.base["host"]["weights"] == on_gpu.base["device"]["weights"]
    on_disk = estimate_memory(LLAMA2_7B, device="cuda", weights="disk")
    assert on_disk.base["device"]["embeddings and head"] == 2 * 32000 * 4096 * 2
    assert on_disk.need("load", "host") < 1 * GIB
    offload = estimate_memory(LLAMA2_7B, device="cuda", weights="cpu-offload")
    assert offload.base["host"]["block weights (accelerate's weights map)"] == 32 * 202_375_168 * 2
    # on a CPU compute device the device is the host
    on_cpu = estimate_memory(LLAMA2_7B, device="cpu")
    assert on_cpu.resources == ("host", "disk") and "device" not in on_cpu.base
    assert on_cpu.base["host"]["weights"] == on_gpu.base["device"]["weights"]


def test_offloading_keeps_memory_flat_in_depth_and_moves_the_growth_to_disk():
    shallow = estimate_memory(LLAMA_1B, device="cuda", weights="disk", method="sparsegpt", allocation="msp")
    deep = estimate_memory(dict(LLAMA_1B, num_hidden_layers=88), device="cuda", weights="disk",
                           method="sparsegpt", allocation="msp")
    for stage in ("prune", "search"):  # one block at a time; the search is memory-bounded
        assert deep.need(stage, "device") == shallow.need(stage, "device")
        assert deep.need(stage, "host") == shallow.need(stage, "host")
    assert deep.need("search", "disk") == pytest.approx(4 * shallow.need("search", "disk"))
    assert deep.need("prune", "disk") == 4 * shallow.need("prune", "disk") > 0  # the offload folder
    # the Fisher pass keeps every block's input of one sequence: linear in depth, small
    assert shallow.need("fisher", "device") < deep.need("fisher", "device") < shallow.need("fisher", "device") + GIB
    in_memory = estimate_memory(LLAMA_1B, device="cuda", weights="device")
    deeper = estimate_memory(dict(LLAMA_1B, num_hidden_layers=88), device="cuda", weights="device")
    assert deeper.need("prune", "device") > 3 * in_memory.need("prune", "device") / 2


def test_fisher_runs_whole_model_only_with_the_model_on_the_compute_device():
    whole = estimate_memory(LLAMA2_7B, device="cuda", weights="device", allocation="fisher")
    assert "every block's activations (one sequence)" in whole.stages["fisher"]["device"]
    for weights in ("host", "cpu-offload", "disk"):
        blockwise = estimate_memory(LLAMA2_7B, device="cuda", weights=weights, allocation="fisher")
        assert "every block's input (one sequence)" in blockwise.stages["fisher"]["device"]
        assert sum(blockwise.stages["fisher"]["device"].values()) < sum(whole.stages["fisher"]["device"].values())
    # on the CPU a model held on the host is the model on the compute device
    cpu = estimate_memory(LLAMA2_7B, device="cpu", weights="host", allocation="fisher")
    assert "every block's activations (one sequence)" in cpu.stages["fisher"]["host"]


def test_stages_follow_the_method_and_allocation():
    uniform = estimate_memory(LLAMA_1B, method="wanda")
    assert list(uniform.stages) == ["load", "capture", "prune", "evaluation", "save (dense)"]
    magnitude = estimate_memory(LLAMA_1B, method="magnitude", evaluate=False, save=None)
    assert list(magnitude.stages) == ["load", "prune"]
    msp = estimate_memory(LLAMA_1B, method="sparsegpt", allocation="msp")
    assert list(msp.stages)[:6] == ["load", "capture", "fisher", "search statistics", "search", "prune"]
    owl = estimate_memory(LLAMA_1B, allocation="owl", method="sparsegpt")
    # OWL gathers input norms whatever the method; the final SparseGPT prune gathers Hessians
    assert owl.stages["owl statistics"]["host"]["one block's input statistics"] == (3 * 2048 + 5632) * 8
    assert owl.stages["prune"]["host"]["one block's input statistics"] == (3 * 2048**2 + 5632**2) * 4
    sparsegpt = estimate_memory(LLAMA_1B, method="sparsegpt")
    assert sparsegpt.need("prune", "host") > uniform.need("prune", "host")
    assert sparsegpt.stages["prune"]["host"]["factorization"] > 0


def test_hessians_and_their_factorization_follow_the_distinct_inputs():
    estimate = estimate_memory(LLAMA2_7B, method="sparsegpt", device="cuda")
    prune = estimate.stages["prune"]["device"]
    h, i = 4096, 11008
    assert prune["one block's input statistics"] == (3 * h * h + i * i) * 4  # q/k/v, o, gate/up, down
    # factoring down_proj's input: the three factors before it stay cached, three matrices of its width live
    assert prune["factorization"] == (3 * h * h + 3 * i * i) * 4


def test_search_memory_is_bounded_by_its_options_and_its_disk_by_the_levels():
    def search(**options):
        return estimate_memory(LLAMA2_7B, device="cuda", weights="disk", method="sparsegpt", allocation="msp",
                               **options)

    default = search()
    bank = default.stages["search"]["device"]["weight bank (LRU, search_bank_mb)"]
    assert bank == 1024 * 2**20
    assert search(search_bank_mb=4096).stages["search"]["device"]["weight bank (LRU, search_bank_mb)"] == 4 * bank
    assert search(search_bank_mb=4096).need("search", "device") > default.need("search", "device")
    assert search(search_cache_mb=64).need("search", "device") < default.need("search", "device")
    # disk: every layer x 17 levels (target +- 0.2 in steps of 0.025) x one pruned fp16 weight
    spilled = {k: v for k, v in default.stages["search"]["disk"].items() if k.startswith("spilled")}
    assert list(spilled.values()) == [32 * 202_375_168 * 17 * 2]
    wanda = estimate_memory(LLAMA2_7B, device="cuda", weights="disk", method="wanda", allocation="msp")
    wanda_spilled = sum(v for k, v in wanda.stages["search"]["disk"].items() if k.startswith("spilled"))
    assert wanda_spilled == 32 * 202_375_168 * 17  # one byte per weight: a mask
    assert search(max_deviation=0.1).need("search", "disk") < default.need("search", "disk")


def test_visited_levels_bound():
    options = dict(sparsity=0.5, max_deviation=0.2, level_step=0.025, max_layer_sparsity=0.95,
                   pattern_kind="unstructured", m=None, population_size=12, generations=10)
    assert visited_levels(options) == 17
    assert visited_levels(dict(options, sparsity=0.1)) == 4 + 8 + 1  # no level below 0
    assert visited_levels(dict(options, population_size=2, generations=1)) == 4  # at most the plans evaluated
    assert visited_levels(dict(options, pattern_kind="mixed-n:m", m=8)) == 3  # N of 3..5 out of 8


def test_compact_save_is_smaller_on_disk():
    dense = estimate_memory(LLAMA2_7B, save="dense")
    sparse = estimate_memory(LLAMA2_7B, save="sparse")
    pruned = 32 * 202_375_168
    outside = 2 * 32000 * 4096 * 2
    assert dense.need("save (dense)", "disk") == pruned * 2 + outside
    assert sparse.need("save (sparse)", "disk") == pytest.approx(pruned * 2 * 0.5625 + outside)
    assert compact_bytes_per_weight(dict(sparsity=0.05, pattern_kind="unstructured"), 2) == 2  # never above dense
    assert compact_bytes_per_weight(dict(sparsity=0.5, pattern_kind="n:m", m=4), 2) == 0.5 * (2 + 2 / 8)


def test_dtype_and_gpt2_names():
    bf16 = estimate_memory(LLAMA_1B)
    fp32 = estimate_memory(LLAMA_1B, dtype="float32")
    assert fp32.base["host"]["weights"] == 2 * bf16.base["host"]["weights"]
    gpt2 = ModelShape.from_config(tiny_config("gpt2").to_dict())
    assert gpt2.block_params == 4 * 64 * 64 + 2 * 64 * 128  # c_attn, c_proj, c_fc, mlp.c_proj: no gate
    assert not gpt2.gated and gpt2.tied
    with pytest.raises(ValueError, match="hidden_size"):
        estimate_memory({"vocab_size": 10})
    with pytest.raises(ValueError, match="int8"):
        estimate_memory(LLAMA_1B, dtype="int8")
    with pytest.raises(ValueError, match="weights='gpu'"):
        estimate_memory(LLAMA_1B, weights="gpu")
    with pytest.raises(ValueError, match="search_bank_mb"):
        estimate_memory(LLAMA_1B, allocation="msp", search_bank_mb=-1)


def test_verdict_names_the_resource_that_does_not_fit():
    estimate = estimate_memory(LLAMA2_7B, device="cuda:1", weights="device", method="sparsegpt")
    stage, device_peak = estimate.peak("device")
    just_enough = f"cuda:1={device_peak}B"
    assert estimate_memory(LLAMA2_7B, device="cuda:1", method="sparsegpt", max_memory=just_enough).fits
    short = estimate_memory(LLAMA2_7B, device="cuda:1", method="sparsegpt", max_memory=f"cuda:1={device_peak - 1}B,"
                            "cpu=1TiB")
    assert not short.fits
    assert short.verdict(stage) == (f"does not fit: cuda:1 needs {device_peak / GIB:.2f} GiB, has "
                                    f"{(device_peak - 1) / GIB:.2f} GiB")
    assert short.verdict("load") == "fits"
    # the host limit is checked too, and a resource left out of max_memory is not limited
    host_short = estimate_memory(LLAMA2_7B, device="cuda:1", weights="host", max_memory="cpu=8GiB")
    assert all(v.startswith("does not fit: cpu needs") for v in map(host_short.verdict, host_short.stages))
    disk_short = estimate_memory(LLAMA2_7B, device="cuda:1", weights="disk", max_memory={"disk": "1GB", 1: "80GiB"})
    assert disk_short.verdict("load") == "fits" and disk_short.verdict("prune").startswith("does not fit: disk")
    # on a CPU compute device, "cpu" limits all memory
    on_cpu = estimate_memory(LLAMA2_7B, max_memory="cpu=13.5GiB")  # 12.55 GiB of weights
    assert on_cpu.verdict("load") == "fits" and not on_cpu.fits
    assert estimate.verdict("load") == "(no max_memory given)"


def test_max_memory_parser():
    assert parse_max_memory("cuda:0=80GiB, cpu=200GiB,disk=1TB") == {"cuda:0": 80 * GIB, "cpu": 200 * GIB,
                                                                     "disk": 10**12}
    assert parse_max_memory({0: "80GB", "cpu": 1024}) == {"cuda:0": 80 * 10**9, "cpu": 1024}  # accelerate's form
    assert parse_max_memory("cuda=1.5GiB") == {"cuda:0": int(1.5 * GIB)}
    for text, message in [("cpu", r"'cpu' is not DEVICE=SIZE"), ("gpu0=80GiB", r"'gpu0=80GiB': unknown device 'gpu0'"),
                          ("cpu=64", r"'cpu=64': '64' has no unit"), ("cpu=64GiBs", r"unknown unit 'GiBs'"),
                          ("cpu=lots", r"'cpu=lots': 'lots' is not a size"),
                          ("0=80GiB,cuda:0=40GiB", r"'cuda:0=40GiB': cuda:0 is given twice"), (" , ", "empty")]:
        with pytest.raises(ValueError, match=message):
            parse_max_memory(text)
    with pytest.raises(ValueError, match="max_memory names cuda:1, but blocks are computed on cuda:0"):
        estimate_memory(LLAMA_1B, device="cuda", max_memory="cuda:1=80GiB")
    with pytest.raises(ValueError, match="max_memory names cuda:0, but blocks are computed on cpu"):
        estimate_memory(LLAMA_1B, max_memory="cuda:0=80GiB")
    with pytest.raises(ValueError, match="device 'tpu'"):
        estimate_memory(LLAMA_1B, device="tpu")


def test_estimate_command_exit_status(tmp_path, capsys):
    from tiny_models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path)
    assert main(["estimate", str(tmp_path), "--allocation", "msp", "--max-memory", "cpu=64GiB,disk=1TB"]) == 0
    out = capsys.readouterr().out
    assert "| search |" in out and "fits in --max-memory" in out
    assert main(["estimate", str(tmp_path), "--max-memory", "cpu=100MiB"]) == 1  # below the runtime alone
    assert "does not fit: cpu needs 0.45 GiB, has 0.10 GiB" in capsys.readouterr().out
    assert main(["estimate", str(tmp_path), "--device", "cuda", "--weights", "disk",
                 "--max-memory", "cuda:0=1GiB,cpu=1GiB,disk=10KB"]) == 1
    assert "does not fit: disk needs" in capsys.readouterr().out
    assert main(["estimate", str(tmp_path), "--max-memory", "cpu=64"]) == 2
    assert "'cpu=64': '64' has no unit" in capsys.readouterr().err
    assert main(["estimate", str(tmp_path)]) == 0  # no limit: nothing to fail
    with pytest.raises(SystemExit):
        main(["estimate", "--help"])
    assert "1 when a stage does not fit" in " ".join(capsys.readouterr().out.split())


def _doc_rows():
    text = (Path(__file__).parents[1] / "docs" / "scaling.md").read_text()
    pattern = re.compile(r"^\| (LLaMA-2-\w+) \| (\w+) / (\w+) \| ([\w:-]+) on ([\w:]+) \| ([\d.]+) \| ([\d.]+) \| "
                         r"([\d.]+) \|", re.MULTILINE)
    return pattern.findall(text)


def test_the_documented_llama2_examples_are_what_the_estimate_says():
    rows = _doc_rows()
    assert len(rows) >= 8
    configs = {"LLaMA-2-7B": LLAMA2_7B, "LLaMA-2-70B": LLAMA2_70B}
    for model, method, allocation, weights, device, device_gib, host_gib, disk_gib in rows:
        estimate = estimate_memory(configs[model], method=method, allocation=allocation, weights=weights,
                                   device=device)
        peaks = [estimate.peak(resource)[1] / GIB for resource in ("device", "host", "disk")]
        assert [float(device_gib), float(host_gib), float(disk_gib)] == pytest.approx(peaks, abs=0.051), model

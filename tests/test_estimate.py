import pytest

from optimum_msp.commands.cli import main
from optimum_msp.estimate import estimate_memory
from tiny_models import tiny_config

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, dtype="bfloat16")


def test_offloading_leaves_only_what_sits_outside_the_blocks_resident():
    in_memory = estimate_memory(LLAMA_1B)
    offloaded = estimate_memory(LLAMA_1B, offloaded=True)
    assert in_memory.base["resident_weights"] == pytest.approx(1.1e9 * 2, rel=0.05)  # 1.1B bf16 weights
    assert offloaded.base["resident_weights"] == 2 * 32000 * 2048 * 2  # embeddings and head only
    deeper = estimate_memory(dict(LLAMA_1B, num_hidden_layers=88), offloaded=True)
    assert deeper.total == offloaded.total  # flat in depth when the blocks are on disk
    assert estimate_memory(dict(LLAMA_1B, num_hidden_layers=88)).total > 3 * in_memory.total / 2


def test_stages_add_what_they_hold():
    uniform = estimate_memory(LLAMA_1B, method="wanda")
    assert list(uniform.stages) == ["prune"]
    sparsegpt = estimate_memory(LLAMA_1B, method="sparsegpt")
    assert sparsegpt.stages["prune"]["statistics"] > 0 and sparsegpt.total > uniform.total
    msp = estimate_memory(LLAMA_1B, method="sparsegpt", allocation="msp")
    assert set(msp.stages) == {"prune", "fisher", "search"} and msp.peak_stage == "search"
    assert msp.stages["search"]["dense_copy"] == pytest.approx(22 * (2 * 2048 * 2048 + 2 * 2048 * 256
                                                                    + 3 * 2048 * 5632) * 2)
    cache_capped = estimate_memory(LLAMA_1B, allocation="msp", search_cache_mb=64)
    assert cache_capped.stages["search"]["block_output_cache"] < 65 * 2**20 + 4 * 256 * 2048 * 2


def test_gpt2_names_are_understood():
    config = tiny_config("gpt2").to_dict()
    assert estimate_memory(config).total > 0
    with pytest.raises(ValueError, match="hidden_size"):
        estimate_memory({"vocab_size": 10})


def test_estimate_command_says_whether_it_fits(tmp_path, capsys):
    from tiny_models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path)
    assert main(["estimate", str(tmp_path), "--allocation", "msp", "--max-memory", "64"]) == 0
    out = capsys.readouterr().out
    assert "search" in out and "fits in --max-memory 64 GiB" in out
    assert main(["estimate", str(tmp_path), "--max-memory", "0.05"]) == 1  # below the runtime alone
    assert "does NOT fit" in capsys.readouterr().out

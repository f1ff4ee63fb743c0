"""A few integration tests on the real bundled SmolLM2-135M (LLaMA architecture, 30 blocks)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_msp import MSPConfig, MSPPruner, SparsityPlan
from optimum_msp.data import calibration_windows
from optimum_msp.evaluation import evaluation_ids, perplexity
from optimum_msp.modeling.blocks import find_decoder_blocks
from optimum_msp.utils import local_data_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pruner(smollm2_path):
    return MSPPruner.from_pretrained(smollm2_path)


def test_bundled_model_is_a_30_block_llama(pruner):
    name, blocks = find_decoder_blocks(pruner.model)
    assert len(blocks) == 30 and pruner.model.config.model_type == "llama"


@pytest.mark.skipif(local_data_dir() is None, reason="needs ../shared/data")
def test_wikitext_protocol_token_count(pruner):
    ids = evaluation_ids(pruner.tokenizer, "wikitext2", "test")
    assert ids.shape[1] == 303_415  # the joined raw test file, tokenized once (shared/DESIGN.md)
    assert ids.shape[1] // 2048 == 148


@pytest.mark.skipif(local_data_dir() is None, reason="needs ../shared/data")
def test_bos_auto_is_the_literature_protocol_for_smollm2(pruner):
    """SmolLM2's tokenizer names a BOS (<|im_start|>) but never adds it: bos="auto" leaves every window as the
    benchmarks measured it (same calibration draws, same evaluation windows, same perplexity)."""
    from optimum_msp.data import evaluation_windows, resolve_bos, sample_starts, take_windows, tokenizer_adds_bos

    tokenizer = pruner.tokenizer
    assert tokenizer.bos_token_id is not None and tokenizer("x").input_ids == [104]
    assert not tokenizer_adds_bos(tokenizer) and resolve_bos("auto", tokenizer) is None
    ids = evaluation_ids(tokenizer, "wikitext2", "test")
    windows = evaluation_windows(ids, 2048, None, resolve_bos("auto", tokenizer))
    assert torch.equal(windows, evaluation_windows(ids, 2048))
    calibration = calibration_windows(tokenizer, "wikitext2", num_samples=4, seqlen=256, seed=0)
    text = evaluation_ids(tokenizer, "wikitext2", "validation")
    assert torch.equal(calibration, take_windows(text, sample_starts(text.shape[1], 4, 256, 0), 256))
    short = ids[:, :1024]
    assert perplexity(pruner.model, tokenizer, input_ids=short, seqlen=512) == perplexity(
        pruner.model, input_ids=short, seqlen=512, bos="never")


@pytest.mark.skipif(local_data_dir() is None, reason="needs ../shared/data")
def test_wanda_2of4_on_the_real_model(pruner, tmp_path):
    ids = evaluation_ids(pruner.tokenizer, "wikitext2", "test")[:, :1024]
    dense = perplexity(pruner.model, input_ids=ids, seqlen=512)
    calibration = calibration_windows(pruner.tokenizer, "wikitext2", num_samples=4, seqlen=256, seed=0)
    pruner.prune(MSPConfig(method="wanda", pattern="2:4", seqlen=256, num_calibration_samples=4),
                 calibration=calibration)
    report = SparsityPlan.from_config(pruner.model.config).verify(pruner.model)
    assert report.nm_compliant
    assert 0.5 <= report.global_sparsity < 0.5 + 1e-4  # dequantised weights hold a few exact zeros already
    assert len(report.layers) == 30 * 7
    pruned = perplexity(pruner.model, input_ids=ids, seqlen=512)
    assert dense < pruned < 50 * dense  # worse than dense, far from collapsed

    out = pruner.save_pretrained(tmp_path / "smollm2-wanda-2of4")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    sample = ids[:, :64]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample).logits, pruner.model(sample).logits, rtol=0, atol=0)

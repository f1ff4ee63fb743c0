"""The ``bos`` rule: every window a model is fed (calibration, Fisher, MSP fitness, perplexity) starts with the
tokenizer's BOS token exactly when the rule says so, ``seqlen`` counts it, and the choice is recorded."""

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from optimum_msp import MSPConfig, MSPPruner, SparsityPlan
from optimum_msp.data import (
    BOS_CHOICES, LITERATURE_BOS, CalibrationData, calibration_text_ids, calibration_windows, evaluation_windows,
    locate_windows, resolve_bos, tokenizer_adds_bos,
)
from optimum_msp.evaluation import METRICS, perplexity, perplexity_report
from tiny_models import CharTokenizer, tiny_model, word_corpus, word_tokenizer

BOS_ID = 1  # "<bos>" in word_tokenizer


@pytest.fixture(scope="module")
def bos_tokenizer():
    return word_tokenizer(adds_bos=True)


@pytest.fixture(scope="module")
def plain_tokenizer():
    return word_tokenizer(adds_bos=False)


@pytest.fixture
def corpus(tmp_path):
    return str(word_corpus(tmp_path / "corpus.txt"))


def _tokenizer(kind):
    return word_tokenizer(adds_bos=kind == "adds-bos")


# which settings put BOS first, for a tokenizer that adds one to a plain encode and for one that does not
EXPECTED = {("adds-bos", "auto"): True, ("adds-bos", "always"): True, ("adds-bos", "never"): False,
            ("no-bos", "auto"): False, ("no-bos", "always"): True, ("no-bos", "never"): False}
CASES = sorted(EXPECTED)


def _assert_windows(windows, text_ids, seqlen, expected_bos):
    """``windows`` are ``seqlen`` long, start with BOS iff ``expected_bos``, and are otherwise whole slices of
    the text (no BOS anywhere else)."""
    assert windows.shape[1] == seqlen
    assert bool((windows[:, 0] == BOS_ID).all()) is expected_bos
    assert not bool((windows[:, 0] == BOS_ID).any()) or expected_bos
    text = windows[:, 1:] if expected_bos else windows
    assert not bool((text == BOS_ID).any())
    assert len(locate_windows(text_ids, text)) >= windows.shape[0]


# ------------------------------------------------------------------------------------------------- the rule
def test_the_tokenizers_of_both_kinds_are_told_apart(bos_tokenizer, plain_tokenizer):
    assert bos_tokenizer("w1 w2").input_ids == [BOS_ID, 4, 5]
    assert plain_tokenizer("w1 w2").input_ids == [4, 5] and plain_tokenizer.bos_token_id == BOS_ID
    assert tokenizer_adds_bos(bos_tokenizer)
    assert not tokenizer_adds_bos(plain_tokenizer)
    assert not tokenizer_adds_bos(word_tokenizer(adds_bos=False, has_bos=False))
    assert not tokenizer_adds_bos(CharTokenizer()) and not tokenizer_adds_bos(None)


@pytest.mark.parametrize("kind,bos", CASES)
def test_resolve_bos(kind, bos):
    expected = BOS_ID if EXPECTED[(kind, bos)] else None
    assert resolve_bos(bos, _tokenizer(kind)) == expected
    if bos != "auto":  # True / False are Python spellings of always / never
        assert resolve_bos(bos == "always", _tokenizer(kind)) == expected


def test_always_without_a_bos_token_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match="bos='always'.*no BOS token"):
        resolve_bos("always", word_tokenizer(adds_bos=False, has_bos=False))
    with pytest.raises(ValueError, match="bos='always'.*no tokenizer"):
        resolve_bos(True, None)
    with pytest.raises(ValueError, match="bos must be one of"):
        resolve_bos("yes", word_tokenizer(adds_bos=True))
    # auto and never need no BOS token (nor a tokenizer)
    assert resolve_bos("auto", word_tokenizer(adds_bos=False, has_bos=False)) is None
    assert resolve_bos("auto", None) is None and resolve_bos(LITERATURE_BOS, None) is None


# ------------------------------------------------------------------------------------- calibration windows
@pytest.mark.parametrize("kind,bos", CASES)
def test_calibration_and_held_out_windows_start_with_bos_exactly_when_they_should(corpus, kind, bos):
    tokenizer = _tokenizer(kind)
    expected = EXPECTED[(kind, bos)]
    text_ids = calibration_text_ids(tokenizer, corpus)
    data = CalibrationData.draw(tokenizer, corpus, num_samples=6, seqlen=40, seed=0, bos=bos)
    _assert_windows(data.ids, text_ids, 40, expected)
    assert data.recipe["bos"] is expected and data.recipe["seqlen"] == 40  # seqlen counts the BOS
    assert torch.equal(calibration_windows(tokenizer, corpus, 6, 40, seed=0, bos=bos), data.ids)

    held_out = data.held_out(5, 24, seed=1)
    _assert_windows(held_out, text_ids, 24, expected)
    taken = locate_windows(text_ids, data.ids[:, 1:] if expected else data.ids)
    assert len(taken) >= 6
    for start, length in locate_windows(text_ids, held_out[:, 1:] if expected else held_out):
        assert all(start + length <= other or other + other_length <= start for other, other_length in taken)


def test_bos_windows_hold_one_text_token_fewer(corpus, bos_tokenizer):
    with_bos = CalibrationData.draw(bos_tokenizer, corpus, 4, 32, seed=0, bos="always")
    without = CalibrationData.draw(bos_tokenizer, corpus, 4, 32, seed=0, bos="never")
    assert with_bos.ids.shape == without.ids.shape == (4, 32)
    with pytest.raises(ValueError, match="seqlen=1.*only the BOS"):
        CalibrationData.draw(bos_tokenizer, corpus, 4, 1, bos="always")
    assert CalibrationData.draw(bos_tokenizer, corpus, 4, 1, bos="never").ids.shape == (4, 1)


def test_given_windows_are_used_as_they_are_and_held_out_windows_avoid_them(corpus, bos_tokenizer, caplog):
    text_ids = calibration_text_ids(bos_tokenizer, corpus)
    calibration = calibration_windows(bos_tokenizer, corpus, 20, 60, seed=5, bos="always")
    data = CalibrationData.given(calibration, bos_tokenizer, corpus, seed=0)
    assert data.ids is calibration and data.recipe["bos"] is True
    held_out = data.held_out(6, 30, seed=1)
    _assert_windows(held_out, text_ids, 30, True)
    taken = locate_windows(text_ids, calibration[:, 1:])
    assert len(taken) >= 20
    for start, length in locate_windows(text_ids, held_out[:, 1:]):
        assert all(start + length <= other or other + other_length <= start for other, other_length in taken)
    # windows that disagree with the rule are kept, recorded as they are, and the mismatch is said
    with caplog.at_level(logging.WARNING, logger="optimum_msp.data"):
        plain = calibration_windows(bos_tokenizer, corpus, 4, 60, seed=5, bos="never")
        data = CalibrationData.given(plain, bos_tokenizer, corpus, seed=0)
    assert data.recipe["bos"] is False and "do not start with the BOS token" in caplog.text
    _assert_windows(data.held_out(2, 30, seed=1), text_ids, 30, True)
    # without a tokenizer nothing is known about BOS
    assert CalibrationData.given(plain).recipe["bos"] is None


# --------------------------------------------------------------------- every path of a prune, and the plan
def _record_inputs(model):
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[0] if args else kwargs["input"]).detach().clone())

    handle = model.get_input_embeddings().register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("kind", ["adds-bos", "no-bos"])
def test_every_window_of_an_msp_prune_follows_auto_and_the_plan_records_it(tmp_path, kind):
    """Calibration statistics, the Fisher pass (slices of the calibration windows), the search's held-out fitness
    windows and the final prune: every sequence the model sees starts with BOS iff the tokenizer adds one."""
    tokenizer = _tokenizer(kind)
    expected = kind == "adds-bos"
    corpus = str(word_corpus(tmp_path / "corpus.txt"))
    model = tiny_model("llama")
    seen, handle = _record_inputs(model)
    config = MSPConfig(method="wanda", sparsity=0.5, allocation="msp", calibration_dataset=corpus,
                       num_calibration_samples=4, seqlen=32, fisher_samples=2, fisher_seqlen=16, fitness_samples=2,
                       fitness_seqlen=24, population_size=4, generations=1)
    pruner = MSPPruner(model, tokenizer)
    pruner.prune(config)
    handle.remove()
    lengths = {batch.shape[1] for batch in seen}
    assert {32, 16, 24} <= lengths  # calibration, Fisher and fitness windows were all fed
    for batch in seen:
        assert bool((batch[:, 0] == BOS_ID).all()) is expected
        assert not bool((batch[:, 1:] == BOS_ID).any())
    plan = SparsityPlan.from_config(model.config)
    assert plan.calibration["bos"] is expected and plan.calibration["seqlen"] == 32
    pruner.save_pretrained(tmp_path / "out", plot=False)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["sparsity_plan"]["calibration"]["bos"] is expected
    assert json.loads((tmp_path / "out" / "msp_config.json").read_text())["bos"] == "auto"


def test_config_bos_reaches_the_calibration(tmp_path):
    corpus = str(word_corpus(tmp_path / "corpus.txt"))
    pruner = MSPPruner(tiny_model("llama"), word_tokenizer(adds_bos=True))
    config = MSPConfig(method="wanda", sparsity=0.5, calibration_dataset=corpus, num_calibration_samples=2,
                       seqlen=16, bos="never")
    assert pruner.calibration(config).recipe["bos"] is False


# ----------------------------------------------------------------------------------------------- the config
def test_config_field_validates_serialises_and_parses_from_the_command_line(tmp_path):
    import argparse

    from optimum_msp.commands.arguments import add_config_arguments, config_from_args

    assert MSPConfig().bos == "auto" and MSPConfig(bos="never").to_dict()["bos"] == "never"
    for wrong in ("yes", True):
        with pytest.raises(ValueError, match="^bos must"):
            MSPConfig(bos=wrong)
    MSPConfig(bos="always").save_pretrained(tmp_path)
    assert MSPConfig.from_pretrained(tmp_path).bos == "always"
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert config_from_args(parser.parse_args(["--bos", "never"])).bos == "never"
    with pytest.raises(SystemExit):
        parser.parse_args(["--bos", "true"])
    assert set(BOS_CHOICES) == {"auto", "always", "never"}


# ----------------------------------------------------------------------------------------------- perplexity
def _rolling_loglikelihood(model, tokens, prefix, max_length):
    """lm-eval's ``loglikelihood_rolling`` of one document, re-implemented from its source (lm_eval 0.4.13,
    ``utils.get_rolling_token_windows`` + ``make_disjoint_window`` with ``context_len=1``, then
    ``_loglikelihood_tokens``): the first window conditions on ``prefix``; every token is predicted once."""
    windows = []
    first = min(max_length, len(tokens))
    windows.append(([prefix] + tokens[: first - 1], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        count = min(len(tokens) - predicted, max_length)
        end = predicted + count
        windows.append((tokens[end - max_length - 1 : end - 1], tokens[end - count : end]))
        predicted += count
    total = 0.0
    with torch.no_grad():
        for context, continuation in windows:
            context = context[: len(context) - (len(continuation) - 1)]  # make_disjoint_window
            sequence = (context + continuation)[-(max_length + 1):][:-1]
            logprobs = F.log_softmax(model(torch.tensor([sequence])).logits[0].float(), dim=-1)
            scored = logprobs[len(sequence) - len(continuation):]
            total += scored.gather(-1, torch.tensor(continuation).unsqueeze(-1)).sum().item()
    return total


@pytest.mark.parametrize("kind,bos", CASES)
def test_perplexity_windows_and_value_are_lm_evals_rolling_loglikelihood(corpus, kind, bos):
    """Each window is one lm-eval document: with BOS, its ``seqlen - 1`` text tokens with the BOS as prefix token;
    without (the literature protocol), the window's tokens after the first, the first one as prefix token."""
    tokenizer, expected, seqlen = _tokenizer(kind), EXPECTED[(kind, bos)], 24
    model = tiny_model("llama")
    ids = calibration_text_ids(tokenizer, corpus)
    report = perplexity_report(model, tokenizer, corpus, "train", seqlen=seqlen, max_windows=3, bos=bos)
    windows = evaluation_windows(ids, seqlen, 3, BOS_ID if expected else None)
    step = seqlen - 1 if expected else seqlen
    for k, window in enumerate(windows):
        assert window.tolist() == ([BOS_ID] if expected else []) + ids[0, k * step : (k + 1) * step].tolist()
    assert report["bos"] is expected and report["windows"] == 3 and report["scored_tokens"] == 3 * (seqlen - 1)
    total = sum(_rolling_loglikelihood(model, window[1:].tolist(), int(window[0]), seqlen) for window in windows)
    assert report["perplexity"] == pytest.approx(math.exp(-total / (3 * (seqlen - 1))), rel=1e-5)
    assert perplexity(model, tokenizer, corpus, "train", seqlen=seqlen, max_windows=3, bos=bos) == report["perplexity"]


def test_perplexity_defaults_keep_the_literature_protocol_without_a_tokenizer():
    model = tiny_model("llama")
    ids = torch.randint(3, 60, (1, 70), generator=torch.Generator().manual_seed(0))
    literature = perplexity(model, input_ids=ids, seqlen=20, bos=LITERATURE_BOS)
    assert perplexity(model, input_ids=ids, seqlen=20) == literature  # auto without a tokenizer: no BOS
    with pytest.raises(ValueError, match="bos='always'"):
        perplexity(model, input_ids=ids, seqlen=20, bos="always")
    with_bos = perplexity(model, word_tokenizer(adds_bos=True), input_ids=ids, seqlen=20)
    assert with_bos != literature
    assert with_bos == perplexity(model, word_tokenizer(adds_bos=False), input_ids=ids, seqlen=20, bos="always")


def test_evaluate_module_reports_the_protocol(bos_tokenizer):
    import evaluate

    model = tiny_model("gpt2")
    metric = evaluate.load(METRICS["perplexity"])
    texts = [" ".join(f"w{(7 * i + j) % 60}" for j in range(12)) for i in range(8)]
    ids = bos_tokenizer("\n".join(texts), add_special_tokens=False, return_tensors="pt").input_ids
    for bos, expected in (("auto", True), ("never", False)):
        result = metric.compute(predictions=texts, model=model, tokenizer=bos_tokenizer, seqlen=16, bos=bos)
        assert result["bos"] is expected
        assert result["num_windows"] == ids.shape[1] // (15 if expected else 16)
        assert result["num_tokens"] == result["num_windows"] * 16
        assert result["num_scored_tokens"] == result["num_windows"] * 15
        assert result["perplexity"] == pytest.approx(
            perplexity(model, bos_tokenizer, input_ids=ids, seqlen=16, bos=bos), rel=1e-6)


def test_model_card_names_the_protocol():
    from optimum_msp.integrations.model_card import perplexity_result

    assert perplexity_result(10.0).metric_name == "Perplexity (seqlen 2048)"
    assert perplexity_result(10.0, bos=False).metric_name == "Perplexity (seqlen 2048, no BOS)"
    assert "BOS first" in perplexity_result(10.0, bos=True).metric_name


# ------------------------------------------------------------------------------------ against lm-eval itself
def _hflm(model, tokenizer, **kwargs):
    lm_eval = pytest.importorskip("lm_eval.models.huggingface", reason="lm-eval is not installed (optional check)")
    return lm_eval.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu", **kwargs)


def test_bos_perplexity_equals_lm_evals_loglikelihood_rolling():
    """lm-eval's own ``loglikelihood_rolling`` on the text of each BOS window (prefix token: the BOS; text
    encoded without special tokens, ``add_bos_token=False``, or lm-eval would put a second BOS after the prefix)."""
    model, seqlen, bos_tokenizer = tiny_model("llama"), 16, word_tokenizer(adds_bos=True)
    lm = _hflm(model, bos_tokenizer, add_bos_token=False, max_length=seqlen)
    from lm_eval.api.instance import Instance

    ids = torch.randint(3, 63, (1, 3 * (seqlen - 1)), generator=torch.Generator().manual_seed(0))
    windows = evaluation_windows(ids, seqlen, bos_token_id=BOS_ID)
    texts = [bos_tokenizer.decode(window[1:]) for window in windows]
    assert [bos_tokenizer(text, add_special_tokens=False).input_ids for text in texts] == windows[:, 1:].tolist()
    requests = [Instance("loglikelihood_rolling", {}, (text,), index) for index, text in enumerate(texts)]
    total = sum(lm.loglikelihood_rolling(requests, disable_tqdm=True))
    expected = math.exp(-total / (3 * (seqlen - 1)))
    assert perplexity(model, bos_tokenizer, input_ids=ids, seqlen=seqlen) == pytest.approx(expected, rel=1e-5)


def test_literature_perplexity_equals_lm_evals_rolling_windows_with_the_first_token_as_prefix():
    model, seqlen, plain_tokenizer = tiny_model("llama"), 16, word_tokenizer(adds_bos=False)
    lm = _hflm(model, plain_tokenizer, max_length=seqlen)
    from lm_eval import utils

    ids = torch.randint(3, 63, (1, 3 * seqlen), generator=torch.Generator().manual_seed(0))
    total = 0.0
    for window in evaluation_windows(ids, seqlen).tolist():
        rolling = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
            token_list=window[1:], prefix_token=window[0], max_seq_len=seqlen, context_len=1))
        total += sum(value for value, _ in lm._loglikelihood_tokens([(None,) + pair for pair in rolling],
                                                                   disable_tqdm=True))
    expected = math.exp(-total / (3 * (seqlen - 1)))
    assert perplexity(model, plain_tokenizer, input_ids=ids, seqlen=seqlen) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("adds_bos", [True, False])
def test_zero_shot_requests_are_tokenized_and_scored_as_lm_eval_does(adds_bos):
    """Contexts start with BOS exactly as lm-eval's HFLM (``add_bos_token`` unset) starts them, and score alike."""
    from optimum_msp.evaluation.zeroshot.scoring import LoglikelihoodScorer
    from optimum_msp.evaluation.zeroshot.tokenization import encode_pair

    tokenizer, model = word_tokenizer(adds_bos=adds_bos), tiny_model("llama")
    lm = _hflm(model, tokenizer)
    from lm_eval.api.instance import Instance

    requests = [("w1 w2 w3", " w4"), ("w1 w2 w3", " w5 w6"), ("w7", " w8 w9 w10"), ("", "w11 w12")]
    for context, continuation in requests:
        if context:
            ours = encode_pair(tokenizer, context, continuation)
            assert ours == lm._encode_pair(context, continuation)
            assert (ours[0][0] == BOS_ID) is adds_bos
    instances = [Instance("loglikelihood", {}, request, index) for index, request in enumerate(requests)]
    theirs = lm.loglikelihood(instances, disable_tqdm=True)
    ours = LoglikelihoodScorer(model, tokenizer, batch_size=4, show_progress=False).score(requests)
    for (value, greedy), (their_value, their_greedy) in zip(ours, theirs):
        assert value == pytest.approx(their_value, abs=1e-4) and greedy == their_greedy

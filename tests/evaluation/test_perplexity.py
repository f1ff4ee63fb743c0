import math

import evaluate
import pytest
import torch
import torch.nn.functional as F

from optimum_msp.evaluation import METRICS, perplexity
from tiny_models import tiny_model


def test_perplexity_matches_hand_computation():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (1, 70), generator=torch.Generator().manual_seed(0))
    nll = []
    with torch.no_grad():
        for w in range(3):  # 70 tokens -> 3 windows of 20, remainder dropped
            window = ids[:, w * 20 : (w + 1) * 20]
            logits = model(window).logits[0]
            nll.append(F.cross_entropy(logits[:-1], window[0, 1:]).item())
    expected = math.exp(sum(nll) / len(nll))
    assert perplexity(model, input_ids=ids, seqlen=20) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, input_ids=ids, seqlen=20, batch_size=2) == pytest.approx(expected, rel=1e-5)
    first = math.exp(nll[0])
    assert perplexity(model, input_ids=ids, seqlen=20, max_windows=1) == pytest.approx(first, rel=1e-5)


def test_perplexity_needs_a_tokenizer_or_ids():
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(tiny_model("llama"))


def test_evaluate_module_loads_offline_and_agrees():
    class Tok:
        def __call__(self, text, return_tensors=None, add_special_tokens=False, verbose=False):
            class Out:
                input_ids = torch.tensor([[ord(c) % 96 for c in text]])

            return Out()

    model = tiny_model("gpt2")
    metric = evaluate.load(METRICS["perplexity"])
    texts = ["hello world", "pruning keeps the important weights", "goodbye"]
    result = metric.compute(predictions=texts, model=model, tokenizer=Tok(), seqlen=16)
    ids = Tok()("\n".join(texts)).input_ids
    assert result["perplexity"] == pytest.approx(perplexity(model, input_ids=ids, seqlen=16), rel=1e-6)
    assert result["num_windows"] == ids.shape[1] // 16


@pytest.mark.parametrize("kwargs, message", [
    (dict(seqlen=0), "seqlen must be an integer >= 2"),
    (dict(seqlen=1), "seqlen must be an integer >= 2"),
    (dict(seqlen=8, batch_size=0), "batch_size must be an integer >= 1"),
    (dict(seqlen=8, max_windows=0), "max_windows must be a positive integer"),
])
def test_perplexity_refuses_degenerate_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        perplexity(tiny_model("llama"), input_ids=torch.zeros(1, 64, dtype=torch.long), **kwargs)

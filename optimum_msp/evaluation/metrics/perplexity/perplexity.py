"""Perplexity of a causal LM on texts, computed as the pruning literature does (joined, tokenized once,
non-overlapping windows). Load offline with ``evaluate.load("<path to this folder>")``."""

import datasets
import evaluate
import torch

from optimum_msp.data import tokenize_text
from optimum_msp.evaluation.perplexity import perplexity_report

_DESCRIPTION = """Perplexity of a causal language model on a text corpus. The texts are joined with newlines
(as a raw corpus file holds them), tokenized once and cut into non-overlapping windows of `seqlen` tokens
(the remainder is dropped); the result is exp of the mean per-token negative log-likelihood. With `bos`, each
window is the tokenizer's BOS token then `seqlen - 1` text tokens, the BOS not scored; without (the literature
protocol), each window's first token is context only. Either way `seqlen - 1` tokens are scored per window."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the texts (e.g. the lines of WikiText-2 test).
    model_id (str): a Hub id, a local folder or a bundled alias such as "smollm2-135m"; or pass `model`
        and `tokenizer` objects instead.
    seqlen (int): window length, the BOS included, default 2048.
    bos (str or bool): "auto" (default: BOS first in every window when the tokenizer adds one to a plain
        encode), "always" / True, or "never" / False (the literature protocol of the LLaMA tables).
    max_windows (int, optional): only the first windows (quick runs).
    batch_size (int): windows per forward pass.
Returns:
    perplexity (float), num_windows (int), num_tokens (int: tokens fed, num_windows x seqlen, BOS included),
    num_scored_tokens (int: num_windows x (seqlen - 1)), bos (bool: whether the windows started with BOS)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Measurement):
    def _info(self):
        return evaluate.MeasurementInfo(
            module_type="measurement",
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model_id=None, model=None, tokenizer=None, seqlen=2048, max_windows=None,
                 batch_size=1, bos="auto"):
        from optimum_msp.modeling import load_model, load_tokenizer

        if model is None:
            if model_id is None:
                raise ValueError("Pass model_id= (Hub id, folder or alias) or model= and tokenizer=.")
            model, tokenizer = load_model(model_id), load_tokenizer(model_id)
        elif tokenizer is None:
            raise ValueError("A model object needs its tokenizer= as well.")
        ids = tokenize_text(tokenizer, "\n".join(predictions))
        with torch.no_grad():
            report = perplexity_report(model, tokenizer, input_ids=ids, seqlen=seqlen, max_windows=max_windows,
                                       batch_size=batch_size, bos=bos)
        return {"perplexity": report["perplexity"], "num_windows": report["windows"],
                "num_tokens": report["windows"] * seqlen, "num_scored_tokens": report["scored_tokens"],
                "bos": report["bos"]}

"""Tiny randomly initialised causal LMs of several architectures, built from configs (no download)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

VOCAB = 96

_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "gemma": dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16),
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=64, max_position_embeddings=128),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=128),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128),
}

#: Models whose blocks differ by ``config.layer_types``: each block type gets its own attention mask (and,
#: for Gemma 3, its own rotary base), so a runner that replays block 0's arguments everywhere goes wrong.
#: A small sliding window against seqlen 32 makes the sliding and full masks actually differ.
_MIXED_CONFIGS = {
    # the default Gemma 3 pattern: five sliding layers, then a full one
    "gemma3_text_mixed": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8),
    # full attention in the first ``max_window_layers`` layers, sliding after
    "qwen2_sliding": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                          max_window_layers=2),
}

ARCHITECTURES = sorted(_CONFIGS)
MIXED_ARCHITECTURES = sorted(_MIXED_CONFIGS)
#: a fast subset for the heavier end-to-end tests (one rotary decoder, one with Conv1D and learned positions)
CORE_ARCHITECTURES = ["llama", "gpt2"]


def tiny_config(arch: str):
    from transformers import AutoConfig

    kwargs = dict(_CONFIGS[arch] if arch in _CONFIGS else _MIXED_CONFIGS[arch])
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, vocab_size=VOCAB, **kwargs)


def tiny_model(arch: str, seed: int = 0, **config_overrides):
    """A random tiny ``arch`` model; ``config_overrides`` (e.g. ``num_hidden_layers=4``) change its config."""
    torch.manual_seed(seed)
    config = tiny_config(arch)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Random init gives near-identical weight scales; spread them so masks and scores are not degenerate.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(1.0 + torch.rand_like(parameter))
    return model


def calibration_ids(samples: int = 4, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (samples, seqlen), generator=generator)


def level_space(config, layers, numels):
    """The level space an allocator would build for ``config`` (an ``MSPConfig``) over ``layers``."""
    from optimum_msp.allocation.levels import LevelOptions, LevelSpace

    config = config.resolved()
    return LevelSpace.build(config.budget(), LevelOptions.from_values(vars(config)), layers, numels)


class CharTokenizer:
    """One token per character, every id inside the tiny models' vocabulary: enough to test windowing without a
    real vocabulary."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False, verbose=False):
        class Out:
            input_ids = torch.tensor([[ord(c) % VOCAB for c in text]])

        return Out()


#: the special tokens of :func:`word_tokenizer` (ids 0-2); its words are ``w0`` ... ``w{WORDS - 1}`` (ids 3 ...)
SPECIALS = ("<unk>", "<bos>", "<eos>")
WORDS = 60


def word_tokenizer(adds_bos: bool, has_bos: bool = True):
    """A word-level ``PreTrainedTokenizerFast`` built offline, ids inside the tiny models' vocabulary.

    ``adds_bos``: a ``TemplateProcessing`` post-processor puts ``<bos>`` first in every plain encode (LLaMA-2,
    Gemma); without it the tokenizer still names a BOS token but never adds it (GPT-2, SmolLM2). ``has_bos=False``:
    no BOS token at all.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS + tuple(f"w{i}" for i in range(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    specials = dict(eos_token="<eos>", unk_token="<unk>", **({"bos_token": "<bos>"} if has_bos else {}))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def word_corpus(path, words: int = 3_000, seed: int = 0):
    """A text file of ``words`` random words of :func:`word_tokenizer` (one token each; 12 per line)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = [f"w{int(i)}" for i in torch.randint(0, WORDS, (words,), generator=generator)]
    path.write_text("\n".join(" ".join(tokens[i : i + 12]) for i in range(0, words, 12)) + "\n")
    return path

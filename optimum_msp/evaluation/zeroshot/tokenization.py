"""Turning ``(context, continuation)`` strings into token ids exactly as lm-eval's ``HFLM`` does (v0.4.13).

* ``_encode_pair``: trailing whitespace of the context moves to the continuation; the *whole* string is
  encoded and the continuation is what follows the separately-encoded context. (Encoding the two
  halves independently would give different tokens at the seam for BPE tokenizers.)
* ``tok_encode``: with ``add_bos_token`` unset (lm-eval's default) the tokenizer's own default is used,
  i.e. ``tokenizer.encode(text)`` with ``add_special_tokens=True``: a Llama-2 tokenizer prepends BOS,
  GPT-2's and SmolLM2's (``add_bos_token`` false, no BOS post-processor) add nothing. Special tokens
  are not added again when the text already starts with the decoded prefix token.
* an empty context becomes the prefix token (BOS, else EOS), the continuation encoded bare.
* an input longer than the model's window keeps its last ``max_length + 1`` tokens (the last one is
  only a target), i.e. the context is cut from the left.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

DEFAULT_MAX_LENGTH = 2048  # lm-eval's fallback
_TOKENIZER_INFINITY = 1_000_000_000_000  # transformers reports "no limit" as ~1e30; treat anything this big as unset


def prefix_token_id(tokenizer) -> int:
    """Token standing in for an empty context: BOS, or EOS for tokenizers without one."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, text: str, add_special_tokens: Optional[bool] = None) -> List[int]:
    kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
    if add_special_tokens is None:
        prefix = prefix_token_id(tokenizer)
        if prefix is not None and text.startswith(tokenizer.decode(prefix)):
            kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(text, **kwargs))


def encode_pair(tokenizer, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """``(context_ids, continuation_ids)`` for one request, as lm-eval tokenizes it."""
    if context == "":
        continuation_ids = encode(tokenizer, continuation, add_special_tokens=False)
        prefix = prefix_token_id(tokenizer)
        if continuation_ids and continuation_ids[0] == prefix:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    trailing = len(context) - len(context.rstrip())
    if trailing:
        context, continuation = context[:-trailing], context[-trailing:] + continuation
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def truncate_context(context_ids: List[int], continuation_ids: List[int], max_length: int) -> List[int]:
    """Left-truncate the context so that context + continuation fits ``max_length + 1`` tokens."""
    if len(continuation_ids) > max_length:
        raise ValueError(f"A continuation of {len(continuation_ids)} tokens exceeds the model window {max_length}")
    overflow = len(context_ids) + len(continuation_ids) - (max_length + 1)
    return context_ids[overflow:] if overflow > 0 else context_ids


def model_max_length(model, tokenizer) -> int:
    """lm-eval's ``resolve_max_length``: the (text) config's n_positions / max_position_embeddings / n_ctx,
    then the tokenizer's ``model_max_length`` when it is set, else 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attribute in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attribute, None)
        if value is not None:
            return int(value)
    value = getattr(tokenizer, "model_max_length", None)
    if value is not None and value < _TOKENIZER_INFINITY:
        return int(value)
    return DEFAULT_MAX_LENGTH

"""One generation request checked: the one place every route's input passes.

SGLang's TokenizerManager (`model_tokenizer_manager.py`, one per model) builds the request and
checks sampling ranges and the context; these checks run inside it, before anything is tokenised
or sent: the types SGLang trusts (a seed "abc" or top_logprobs_num "x" used to end the scheduler
process and every model with it), lone surrogates, token ids outside the vocabulary, `rid` shapes,
and the sampling parameters through our parser (`crosspool_sgl.sampling_params`), with the
messages and `param` fields our error bodies carry. Errors are `RequestError`s: a 4xx with an
OpenAI body.
"""

from __future__ import annotations

from typing import Any

from crosspool_sgl.managers.errors import RequestError
from crosspool_sgl.sampling_params import InvalidRequestError, SamplingParams

MAX_CHOICES = 128  # n (parallel samples) per request, as OpenAI's API bounds it
# SGLang's sampling keys that our parser spells differently; `n` is the manager's, not a sampler's
_RENAMED = {"sampling_seed": "seed"}
_NOT_SAMPLING = {"n"}
# GenerateReqInput fields for inputs this server has no model for (it serves text LLMs)
_UNSUPPORTED = ("input_embeds", "image_data", "video_data", "audio_data", "lora_path", "session_params")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_text(text: Any, param: str = "text") -> None:
    if not isinstance(text, str):
        raise RequestError(f"`{param}` must be a string, got {type(text).__name__}", param=param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate ("\ud800") is no text a tokenizer can encode
        raise RequestError(f"`{param}` is not valid Unicode: {e.reason}", param=param) from e


def check_token_ids(ids: Any, vocab_size: int, param: str = "input_ids") -> None:
    if not isinstance(ids, list) or any(not _is_int(t) or not 0 <= t < vocab_size for t in ids):
        raise RequestError(f"`{param}` must be a list of integers in [0, {vocab_size})", param=param)


def check_request(obj: Any, vocab_size: int) -> SamplingParams:
    """The request's own fields (one normalised GenerateReqInput) and its sampling parameters;
    returns the parsed params."""
    if obj.input_ids is not None:
        check_token_ids(obj.input_ids, vocab_size)
    elif obj.text is not None:
        check_text(obj.text)
    else:
        raise RequestError("either `text` or `input_ids` is required", param="text")
    for name in ("return_logprob", "return_text_in_logprobs"):
        if not isinstance(getattr(obj, name), bool):
            raise RequestError(f"`{name}` must be a boolean", param=name)
    if not _is_int(obj.logprob_start_len) or obj.logprob_start_len < -1:
        raise RequestError("`logprob_start_len` must be an integer >= -1", param="logprob_start_len")
    if not _is_int(obj.top_logprobs_num) or not 0 <= obj.top_logprobs_num <= vocab_size:
        raise RequestError(
            f"`top_logprobs_num` must be an integer in [0, {vocab_size}] (the vocabulary size)",
            param="top_logprobs_num",
        )
    if obj.rid is not None and (not isinstance(obj.rid, str) or not obj.rid or len(obj.rid) > 256):
        raise RequestError("`rid` must be a non-empty string of at most 256 characters", param="rid")
    return our_sampling_params(obj.sampling_params)


def our_sampling_params(params: Any) -> SamplingParams:
    """SGLang's sampling dict through our parser (None means SGLang's default and is dropped)."""
    if not isinstance(params, dict):
        raise RequestError("`sampling_params` must be an object", param="sampling_params")
    ours = {_RENAMED.get(k, k): v for k, v in params.items() if v is not None and k not in _NOT_SAMPLING}
    try:
        return SamplingParams.from_dict(ours)
    except (InvalidRequestError, TypeError, ValueError) as e:
        raise RequestError(str(e), param="sampling_params") from e


def rename_seed(params: Any) -> None:
    """Our native API's `seed` is SGLang's `sampling_seed` (SGLang's SamplingParams knows no `seed`)."""
    if isinstance(params, dict) and "seed" in params:
        seed = params.pop("seed")
        if params.get("sampling_seed") is None:
            params["sampling_seed"] = seed


def check_request_ids(rid: Any, is_single: bool) -> None:
    """`rid`: a string, or one per prompt for a batch (SGLang's normaliser keeps e.g. `[]`)."""
    rids = [rid] if is_single else rid
    if not isinstance(rids, list) or not all(r is None or isinstance(r, str) for r in rids):
        raise RequestError("`rid` must be a string (a list of strings for a batch)", param="rid")


def check_supported_fields(obj: Any) -> None:
    """Inputs for models this server does not host (images, audio, adapters) are refused by name."""
    for name in _UNSUPPORTED:
        value = getattr(obj, name, None)
        given = any(v is not None for v in value) if isinstance(value, list) else value is not None
        if given:
            raise RequestError(f"`{name}` is not supported by this server", param=name)


def check_prompt(
    ids: list[int],
    params: SamplingParams,
    context_len: int,
    vocab_size: int,
    model: str,
    check_vocab: bool = True,
) -> None:
    """The tokenised prompt: non-empty, in the vocabulary (a tokenizer's added tokens can lie past the
    model's; `check_vocab=False` for ids `check_request` saw), room for the completion in the context."""
    if not ids:
        raise RequestError("the prompt is empty", param="prompt")
    if len(ids) >= context_len:
        raise RequestError(
            f"This model's maximum context length is {context_len} tokens, "
            f"but the prompt has {len(ids)} tokens (model {model!r})",
            param="prompt",
        )
    if check_vocab:
        check_token_ids(ids, vocab_size)
    if len(ids) + params.max_new_tokens > context_len:
        raise RequestError(
            f"This model's maximum context length is {context_len} tokens; you requested "
            f"{len(ids) + params.max_new_tokens} tokens ({len(ids)} in the prompt, "
            f"{params.max_new_tokens} for the completion; model {model!r})",
            param="max_tokens",
        )


def check_num_choices(n: Any) -> None:
    if n is not None and (not _is_int(n) or not 1 <= n <= MAX_CHOICES):
        raise RequestError(f"`n` must be an integer in [1, {MAX_CHOICES}], got {n!r}", param="n")

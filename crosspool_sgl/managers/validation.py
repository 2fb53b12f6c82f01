"""One generation request checked and built: the one place every route's input passes.

`MultiModelTokenizerManager.submit` calls `check_request` before tokenising, `check_prompt` after,
then `tokenized_request`, which builds what travels to the scheduler: SGLang's
`TokenizedGenerateReqInput` with SGLang's `SamplingParams`, normalised as SGLang's TokenizerManager
leaves them, plus the model (`MultiModelTokenizedGenerateReqInput`). So nothing malformed is ever
sent (a seed "abc" or top_logprobs_num "x" used to end the scheduler process and every model with
it). Errors are `RequestError`s: a 4xx with an OpenAI body.
"""

from __future__ import annotations

from array import array
from typing import Any

from crosspool_sgl.managers.errors import RequestError
from crosspool_sgl.managers.io_struct import MultiModelTokenizedGenerateReqInput, with_unset_fields
from crosspool_sgl.managers.io_struct import SamplingParams as SGLangSamplingParams
from crosspool_sgl.sampling_params import InvalidRequestError, SamplingParams

MAX_CHOICES = 128  # n (parallel samples) per request, as OpenAI's API bounds it


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
    """The request's own fields (GenerateInput) and its sampling parameters; returns the parsed params."""
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
    if not isinstance(obj.sampling_params, dict):
        raise RequestError("`sampling_params` must be an object", param="sampling_params")
    try:
        return SamplingParams.from_dict(obj.sampling_params)
    except (InvalidRequestError, TypeError, ValueError) as e:
        raise RequestError(str(e), param="sampling_params") from e


def check_prompt(
    ids: list[int], params: SamplingParams, context_len: int, vocab_size: int, model: str
) -> None:
    """The tokenised prompt: non-empty, in the vocabulary, and room for the completion in the context."""
    if not ids:
        raise RequestError("the prompt is empty", param="prompt")
    if len(ids) >= context_len:
        raise RequestError(
            f"This model's maximum context length is {context_len} tokens, "
            f"but the prompt has {len(ids)} tokens (model {model!r})",
            param="prompt",
        )
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


def tokenized_request(
    obj: Any, ids: list[int], params: SamplingParams, tokenizer: Any
) -> MultiModelTokenizedGenerateReqInput:
    """A checked request (GenerateInput, its prompt ids and parsed params) as SGLang's struct."""
    start = obj.logprob_start_len
    if obj.return_logprob and start < 0:
        start = len(ids) - 1  # SGLang's default: only the last prompt position
    return with_unset_fields(
        MultiModelTokenizedGenerateReqInput,
        rid=obj.rid,
        model=obj.model,
        input_text=obj.text,
        input_ids=array("q", ids),
        sampling_params=sglang_sampling_params(params, tokenizer),
        return_logprob=obj.return_logprob,
        logprob_start_len=start,
        top_logprobs_num=obj.top_logprobs_num,
        stream=obj.stream,
    )


def sglang_sampling_params(params: SamplingParams, tokenizer: Any) -> SGLangSamplingParams:
    """Our parsed params as SGLang's SamplingParams, normalised as SGLang's TokenizerManager sends them
    (its `__post_init__` spells greedy as top_k 1, `normalize` moves `stop` to `stop_strs`)."""
    out = SGLangSamplingParams(
        max_new_tokens=params.max_new_tokens,
        stop=list(params.stop) or None,
        stop_token_ids=set(params.stop_token_ids) or None,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        repetition_penalty=params.repetition_penalty,
        min_new_tokens=params.min_new_tokens,
        json_schema=params.json_schema,
        regex=params.regex,
        ebnf=params.ebnf,
        structural_tag=params.structural_tag,
        ignore_eos=params.ignore_eos,
        skip_special_tokens=params.skip_special_tokens,
        spaces_between_special_tokens=params.spaces_between_special_tokens,
        no_stop_trim=params.no_stop_trim,
        logit_bias={str(k): v for k, v in params.logit_bias.items()} if params.logit_bias else None,
        sampling_seed=params.seed,
    )
    try:
        out.normalize(tokenizer)
    except ValueError as e:  # SGLang's own bounds (e.g. at most 32 stop strings)
        raise RequestError(str(e), param="stop") from e
    return out

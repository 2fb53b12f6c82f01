"""Parallel sampling (n > 1): the prompt's KV pages are computed once and shared by the n samples.

The n samples of a prompt reach the scheduler together. Its prefix cache holds a prompt's pages
only once a request has computed them, so n copies admitted in one step each match nothing and
each prefill the whole prompt: n copies of its pages in the pool. SGLang's TokenizerManager sends
one prompt-only request per prompt first (`max_new_tokens=0`, "cache the common prefix for
parallel sampling") and the samples after it has finished; we do the same, so every sample
matches the cached pages. (`sgl.fork` gets the same from the frontend itself: it commits the
prefix with a prompt-only request before forking.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from crosspool_sgl.managers.tokenizer_manager import GenerateInput, MultiModelTokenizerManager

__all__ = ["prefill_only", "submit_sharing_prefix"]


def prefill_only(obj: GenerateInput) -> GenerateInput:
    """A request that computes (and so caches) `obj`'s prompt and samples nothing."""
    return GenerateInput(
        model=obj.model,
        text=obj.text,
        input_ids=obj.input_ids,
        sampling_params={"max_new_tokens": 0},
    )


async def submit_sharing_prefix(
    tm: MultiModelTokenizerManager,
    objs: list[GenerateInput],
    n: int,
    is_disconnected: Callable | None = None,
) -> list[Any]:
    """Submit `objs` (prompt-major, the n samples of a prompt adjacent); for n > 1 after one
    prompt-only request per prompt has finished. Returns the samples' states."""
    if n > 1 and len(objs) % n == 0:
        warm = await tm.submit_all([prefill_only(objs[i]) for i in range(0, len(objs), n)])
        await asyncio.gather(*(tm.collect(s, is_disconnected) for s in warm))
    return await tm.submit_all(objs)

"""Penalties, min_new_tokens and logit_bias against SGLang's own penalizers and a float64 recomputation.

The reference is `sglang.srt.sampling.penaltylib`, driven through its orchestrator with a minimal
stand-in for SGLang's ScheduleBatch (`reqs`, `device`) and requests (`sampling_params`,
`eos_token_ids`, `tokenizer`): the same batch, the same output-token histories fed step by step.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.sampling.penaltylib import (
    BatchedFrequencyPenalizer,
    BatchedMinNewTokensPenalizer,
    BatchedPenalizerOrchestrator,
    BatchedPresencePenalizer,
    BatchedRepetitionPenalizer,
)

from crosspool_sgl.core.req import Req
from crosspool_sgl.core.sampling_batch import SamplingState, process_logits
from crosspool_sgl.layers.penalties import TokenCounts
from crosspool_sgl.sampling_params import InvalidRequestError, SamplingParams

EOS = (2, 7)
ROWS = [  # per-row parameters: every penalty on and off, mixed signs, min_new_tokens below/above L
    dict(frequency_penalty=0.7, presence_penalty=0.0, repetition_penalty=1.0, min_new_tokens=0),
    dict(frequency_penalty=0.0, presence_penalty=-1.3, repetition_penalty=1.0, min_new_tokens=20),
    dict(frequency_penalty=-0.4, presence_penalty=0.9, repetition_penalty=1.7, min_new_tokens=3),
    dict(frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=0.6, min_new_tokens=0),
    dict(
        frequency_penalty=2.0,
        presence_penalty=2.0,
        repetition_penalty=2.0,
        min_new_tokens=9,
        stop_token_ids=[11],
    ),
    dict(frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0, min_new_tokens=0),
]


class _Batch:  # what the orchestrator reads from SGLang's ScheduleBatch (weakref-able)
    def __init__(self, reqs, device):
        self.reqs, self.device = reqs, device


def _sglang_logits(logits, params, histories, penalizers):
    """SGLang's penalizers, overlap-mode order (additive, then scaling) as SamplingBatchInfo applies them."""
    reqs = [
        SimpleNamespace(
            sampling_params=SimpleNamespace(
                frequency_penalty=p.frequency_penalty,
                presence_penalty=p.presence_penalty,
                repetition_penalty=p.repetition_penalty,
                min_new_tokens=p.min_new_tokens,
                stop_token_ids=set(p.stop_token_ids),
            ),
            eos_token_ids=set(EOS),
            tokenizer=SimpleNamespace(additional_stop_token_ids=None, eos_token_id=None),
        )
        for p in params
    ]
    batch = _Batch(reqs, torch.device("cpu"))
    orch = BatchedPenalizerOrchestrator(logits.shape[1], batch, penalizers)
    for step in range(len(histories[0])):
        orch.cumulate_output_tokens(torch.tensor([h[step] for h in histories], dtype=torch.int64))
    out = logits.clone()
    orch.accumulate_additive_penalties(out)
    scaling = orch.accumulate_scaling_penalties()
    if scaling is not None:  # SGLang's apply_scaling_penalties, uncompiled (same arithmetic)
        out = torch.where(out < 0, out * scaling, out / scaling)
    return out


def _float64_logits(logits, params, histories):
    out = logits.double().clone()
    for i, (p, hist) in enumerate(zip(params, histories, strict=True)):
        for tok in set(hist):
            c = hist.count(tok)
            out[i, tok] -= p.frequency_penalty * c + p.presence_penalty
            r = p.repetition_penalty
            out[i, tok] = out[i, tok] * r if out[i, tok] < 0 else out[i, tok] / r
        if len(hist) < p.min_new_tokens:
            for tok in set(EOS) | set(p.stop_token_ids):
                out[i, tok] = float("-inf")
        for tok, b in (p.logit_bias or {}).items():
            out[i, tok] += b
    return out


def _ours(logits, params, histories, state=None):
    reqs = []
    for i, (p, hist) in enumerate(zip(params, histories, strict=True)):
        req = Req(f"r{i}", "m", [1, 2, 3], p)
        req.output_ids = list(hist)
        reqs.append(req)
    out, _ = process_logits(logits, reqs, EOS, state or SamplingState(torch.device("cpu")))
    return out


def _case(vocab, length, seed, **extra):
    rng = random.Random(seed)
    params = [SamplingParams.from_dict({"max_new_tokens": 64, **row, **extra}) for row in ROWS]
    # few distinct tokens so counts > 1 occur; include the stop tokens
    histories = [
        [rng.choice([2, 5, 7, 11, vocab - 1, rng.randrange(vocab)]) for _ in range(length)] for _ in ROWS
    ]
    logits = torch.randn(len(ROWS), vocab, generator=torch.Generator().manual_seed(seed)) * 3
    return logits, params, histories


ALL = {
    BatchedFrequencyPenalizer,
    BatchedPresencePenalizer,
    BatchedRepetitionPenalizer,
    BatchedMinNewTokensPenalizer,
}


@pytest.mark.parametrize("vocab", [512, 1003, 32000])
@pytest.mark.parametrize(
    "only",
    [
        ("frequency_penalty", {BatchedFrequencyPenalizer}),
        ("presence_penalty", {BatchedPresencePenalizer}),
        ("repetition_penalty", {BatchedRepetitionPenalizer}),
        ("min_new_tokens", {BatchedMinNewTokensPenalizer}),
        ("all", ALL),
    ],
    ids=lambda x: x[0],
)
def test_each_penalty_matches_sglang_and_float64(vocab, only):
    name, penalizers = only
    logits, params, histories = _case(vocab, length=6, seed=vocab)
    if name != "all":  # switch the others off so one penalizer is compared alone
        neutral = {
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "repetition_penalty": 1.0,
            "min_new_tokens": 0,
        }
        for p in params:
            for k, v in neutral.items():
                if k != name:
                    setattr(p, k, v)
    ref = _sglang_logits(logits, params, histories, penalizers)
    ours = _ours(logits, params, histories)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        ours.double(), _float64_logits(logits, params, histories), rtol=1e-6, atol=1e-5
    )
    assert not torch.equal(ours, logits)  # something was applied


def test_logit_bias_and_uneven_histories_match_float64():
    logits, params, histories = _case(700, length=12, seed=3)
    histories = [h[: 2 + 2 * i] for i, h in enumerate(histories)]  # every row its own length
    params[0].logit_bias = {5: -100.0, 699: 3.5}
    params[3].logit_bias = {0: 1.25}
    torch.testing.assert_close(
        _ours(logits, params, histories).double(),
        _float64_logits(logits, params, histories),
        rtol=1e-6,
        atol=1e-5,
    )


def test_counts_survive_steps_and_rebuild_from_history():
    """The count buffer is fed one token per step; a history that changed under it is recounted."""
    vocab = 64
    counts = TokenCounts(vocab, torch.device("cpu"), capacity=2)
    hists = {f"r{i}": [] for i in range(5)}  # more requests than slots: the buffer grows
    gen = torch.Generator().manual_seed(0)
    for _ in range(7):
        keys = list(hists)
        slots = counts.slots_for(keys, [hists[k] for k in keys])
        toks = torch.randint(0, vocab, (len(keys),), generator=gen)
        counts.add(slots, toks)
        for k, t in zip(keys, toks.tolist(), strict=True):
            hists[k].append(t)
    keys = list(hists)
    hists["r2"] = hists["r2"][:3]  # e.g. rewound: recounted from the history
    slots = counts.slots_for(keys, [hists[k] for k in keys])
    want = torch.stack([torch.bincount(torch.tensor(hists[k]), minlength=vocab) for k in keys]).int()
    assert torch.equal(counts.counts(slots), want)
    counts.release("r0")
    assert "r0" not in counts.slots


def test_no_processing_returns_the_same_tensor():
    logits = torch.randn(2, 10)
    params = [SamplingParams.from_dict({}), SamplingParams.from_dict({"temperature": 0.5})]
    assert _ours(logits, params, [[1], [2]]) is logits


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"min_new_tokens": 10, "max_new_tokens": 5}, "min_new_tokens"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"3": float("nan")}}, "logit_bias"),
        ({"regex": "a", "ebnf": "root ::= 'a'"}, "only one of"),
        ({"json_schema": "{not json"}, "json_schema"),
    ],
)
def test_invalid_values_name_the_field(bad, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams.from_dict(bad)

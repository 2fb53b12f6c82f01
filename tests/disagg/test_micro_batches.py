"""Micro-batch planning and the step trace: pure functions, no model."""

from __future__ import annotations

from types import SimpleNamespace

from crosspool_sgl.disagg.pipeline import choose_num_micro_batches, deal_micro_batches, split_micro_batches
from crosspool_sgl.disagg.trace import FFNCall, StepTrace


def _group(*sizes: int) -> list:
    return [(SimpleNamespace(rid=f"r{i}"), n) for i, n in enumerate(sizes)]


def test_auto_keeps_tiny_batches_whole_and_honours_the_flag():
    assert choose_num_micro_batches(0, num_tokens=1, num_reqs=1) == 1
    assert choose_num_micro_batches(0, num_tokens=3, num_reqs=3) == 1  # three decodes: overhead wins
    assert choose_num_micro_batches(0, num_tokens=64, num_reqs=4) == 2
    assert choose_num_micro_batches(3, num_tokens=1, num_reqs=1) == 3


def test_split_never_cuts_a_request_or_mixes_models_and_keeps_order():
    groups = {"a": _group(10, 1, 1, 8), "b": _group(2)}
    mbs = split_micro_batches(groups, 3)
    assert [m for m, _ in mbs] == ["a", "a", "b"]
    a_parts = [g for m, g in mbs if m == "a"]
    assert [item for g in a_parts for item in g] == groups["a"]  # concatenates back, in order
    assert sum(n for _, n in a_parts[0]) == 10 and sum(n for _, n in a_parts[1]) == 10


def test_split_stops_when_nothing_can_be_split():
    assert len(split_micro_batches({"a": _group(5)}, 4)) == 1
    assert len(split_micro_batches({"a": _group(1), "b": _group(1)}, 1)) == 2  # one per model at least


def test_deal_puts_several_models_in_a_micro_batch_balanced_and_in_order():
    pieces = [("a", _group(10)), ("b", _group(2)), ("c", _group(3)), ("d", _group(6))]
    assert deal_micro_batches(pieces, 1) == [[0, 1, 2, 3]]  # lockstep: every model in one
    two = deal_micro_batches(pieces, 2)
    assert sorted(j for mb in two for j in mb) == [0, 1, 2, 3] and all(mb == sorted(mb) for mb in two)
    assert sorted(sum(pieces[j][1][0][1] for j in mb) for mb in two) == [10, 11]  # tokens per micro-batch
    assert sorted(deal_micro_batches(pieces, 9)) == [[0], [1], [2], [3]]  # never an empty micro-batch


def test_trace_summary_counts_overlap():
    # micro-batch 0's FFN (1.0-2.0) runs while micro-batch 1's attention runs (1.0-2.0)
    c0 = FFNCall(0, "m", 0, attn_start=0.0, attn_end=1.0, sent=1.0, wait_start=2.0, wait_end=2.0)
    c0.worker_times = [(0, 1.0, 2.0)]
    c1 = FFNCall(1, "m", 0, attn_start=1.0, attn_end=2.0, sent=2.0, wait_start=2.0, wait_end=3.0)
    c1.worker_times = [(0, 2.0, 3.0)]
    trace = StepTrace(2, True, start=0.0, end=3.0, calls=[c0, c1])
    s = trace.summary()
    assert s["attn_s"] == 2.0 and s["ffn_s"] == 2.0 and s["idle_s"] == 1.0
    assert s["parts_s"] == 4.0 and s["layers_s"] == 3.0 and s["overlap_s"] == 1.0
    assert "overlap 1000.000 ms" in trace.format()

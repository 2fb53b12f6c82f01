"""Static-buffer decode (core/static_decode.py) against the eager path, on CPU.

Greedy tokens must be identical for every architecture, with several models in one step,
batch sizes that need padding (3 rows in a bucket of 4), page tables that change every step
(pages of 4 tokens handed out in a shuffled order), and padded rows must write no real page.
"""

from __future__ import annotations

import pytest
import torch

from crosspool_sgl.core.static_decode import DecodeRow, StaticDecodeRunner, pick_bucket, width_bucket
from tests.engine.static_decode_helpers import PAGE_TOKENS, build_core, greedy
from tests.engine.test_hf_parity import ALL_ARCHS

CPU = torch.device("cpu")
NEW_TOKENS = 12


def _prompts(archs, per_model: int) -> list[tuple[str, list[int]]]:
    """Prompts of different lengths (3..17 tokens) for each model, interleaved."""
    return [
        (a, [3 + (7 * i + j) % 200 for j in range(3 + 5 * i + k)])
        for i in range(per_model)
        for k, a in enumerate(archs)
    ]


@pytest.fixture(scope="module")
def core(tiny_models):
    return build_core({a: tiny_models[a] for a in ALL_ARCHS}, CPU)


def test_bucket_choice():
    assert pick_bucket(3, (1, 2, 4, 8)) == 4
    assert pick_bucket(1, (8, 1, 2)) == 1
    assert pick_bucket(9, (1, 2, 4, 8)) is None
    assert [width_bucket(n, 16) for n in (1, 16, 17, 33)] == [16, 16, 32, 64]


def test_key_pads_each_model_to_its_bucket(core):
    runner = StaticDecodeRunner(core.models, core.kv_pool, CPU, batch_buckets=(1, 2, 4), min_width=2)
    rows = {
        "llama": [DecodeRow(5, 10, [0, 1, 2])] * 3,  # 3 rows -> bucket 4; position 10 needs 3 pages
        "qwen3": [DecodeRow(5, 2, [0])],
    }
    assert runner.key_for(rows) == ((("llama", 4), ("qwen3", 1)), 4)
    assert runner.key_for({"llama": [DecodeRow(5, 2, [0])] * 5}) is None  # beyond every bucket


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_greedy_tokens_match_eager(core, arch):
    prompts = _prompts([arch], per_model=3)  # 3 rows: padded to a bucket of 4
    eager, eager_hidden = greedy(core, prompts, NEW_TOKENS)
    runner = StaticDecodeRunner(core.models, core.kv_pool, CPU, batch_buckets=(1, 2, 4, 8), min_width=2)
    static, static_hidden = greedy(core, prompts, NEW_TOKENS, runner)
    assert static == eager, f"{arch}: static-buffer greedy tokens differ from eager"
    for a, b in zip(static_hidden, eager_hidden, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # one key per page-table width reached (prompts up to 13 tokens + 12 new, 4-token pages)
    assert runner.stats()["eager_steps"] == NEW_TOKENS - 1
    assert {k[0] for k in runner.entries} == {((arch, 4),)}


def test_models_mixed_in_one_step(core):
    archs = ("qwen3_moe", "llama", "deepseek_v2", "gpt_oss")
    prompts = _prompts(archs, per_model=2) + [("llama", [7, 8, 9])]  # llama: 3 rows, others 2
    eager, _ = greedy(core, prompts, 8)
    runner = StaticDecodeRunner(core.models, core.kv_pool, CPU, batch_buckets=(1, 2, 4), min_width=4)
    static, _ = greedy(core, prompts, 8, runner)
    assert static == eager
    (parts, _width), *_ = runner.entries
    assert dict(parts) == {"qwen3_moe": 2, "llama": 4, "deepseek_v2": 2, "gpt_oss": 2}


def test_padded_rows_write_only_the_scratch_page(core):
    """After a static step on 3 rows in a bucket of 4, the KV arena equals the eager step's except
    the scratch page; pointing padding at a real page would fail here."""
    name = "qwen3"
    kv = core.kv_pool.kv_view(name)
    pages = [core.kv_pool.alloc(name, 2) for _ in range(3)]
    rows = [DecodeRow(10 + i, 5, p) for i, p in enumerate(pages)]
    runner = StaticDecodeRunner(core.models, core.kv_pool, CPU, batch_buckets=(4,), min_width=2)
    try:
        kv[[p for ps in pages for p in ps]] = 0
        hidden = runner.run({name: rows})[name]
        scratch = runner._scratch[name]
        static_kv = kv.clone()
        kv[[p for ps in pages for p in ps]] = 0
        from crosspool_sgl.layers.attention import AttentionMetadata

        meta = AttentionMetadata.build(pages, [6, 6, 6], [1, 1, 1], PAGE_TOKENS, CPU)
        ids, pos = torch.tensor([10, 11, 12]), torch.tensor([5, 5, 5])
        eager = core.models[name].forward(ids, pos, meta, kv)
        keep = torch.ones(kv.shape[0], dtype=torch.bool)
        keep[scratch] = False
        torch.testing.assert_close(static_kv[keep], kv[keep], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden, eager, atol=1e-5, rtol=1e-5)
        assert hidden.shape[0] == 3
    finally:
        for p in pages:
            core.kv_pool.free(name, p)


def test_buffers_are_reused_across_steps(core):
    """One key's buffers serve steps with different page tables and tokens; results follow the rows."""
    name = "llama"
    runner = StaticDecodeRunner(core.models, core.kv_pool, CPU, batch_buckets=(2,), min_width=4)
    a, b = core.kv_pool.alloc(name, 4), core.kv_pool.alloc(name, 4)
    try:
        first = runner.run({name: [DecodeRow(5, 3, a), DecodeRow(6, 9, b)]})[name].clone()
        ids_buffer = runner.entries[next(iter(runner.entries))].slices[0].ids
        second = runner.run({name: [DecodeRow(6, 9, b)]})[name]
        assert (
            len(runner.entries) == 1
            and runner.entries[next(iter(runner.entries))].slices[0].ids is ids_buffer
        )
        torch.testing.assert_close(second[0], first[1], atol=1e-5, rtol=1e-5)  # same row, other slot
        assert not torch.allclose(first[0], first[1])
    finally:
        core.kv_pool.free(name, a)
        core.kv_pool.free(name, b)


def test_engine_static_decode_on_matches_off(tiny_models):
    """The ModelRunner hook: an Engine with --static-decode on gives the same greedy tokens."""
    from crosspool_sgl import Engine

    archs = ("qwen3_moe", "llama", "deepseek_v3")
    outs = {}
    for mode in ("off", "on"):
        eng = Engine(models={a: str(tiny_models[a]) for a in archs}, show_progress=False, static_decode=mode)
        try:
            res = eng.generate(
                prompt=["Hello world", "The quick brown fox", "a b c"] * 2,
                model=[a for a in archs for _ in range(2)],
                sampling_params={"temperature": 0, "max_new_tokens": 10, "ignore_eos": True},
            )
            outs[mode] = [r["output_ids"] for r in res]
            static = eng.runtime.scheduler.runner.static_decode
            if mode == "on":
                assert static.stats()["eager_steps"] > 0
            else:
                assert static is None
        finally:
            eng.shutdown()
    assert outs["on"] == outs["off"]


class _ReplayOnCPU:
    """Stands in for a CUDA graph on CPU: replay reruns the forward into the captured outputs."""

    def __init__(self, runner, entry):
        self.runner, self.entry = runner, entry

    @torch.inference_mode()
    def replay(self):
        for out, new in zip(self.entry.outputs, self.runner._forward(self.entry), strict=True):
            out.copy_(new)


class _FakeGraphRunner(StaticDecodeRunner):
    """The graph bookkeeping (capture once per key, replay into fixed outputs, recapture when the
    weights moved, LRU bound, memory budget) with the CUDA capture replaced."""

    captures = 0

    def _capture(self, key, entry):
        self.captures += 1
        entry.outputs = self._forward(entry)
        entry.graph, entry.epoch = _ReplayOnCPU(self, entry), self._epoch(entry)
        self.graph_bytes += 1


def test_graph_bookkeeping_replays_and_recaptures(core):
    prompts = _prompts(["qwen3_moe"], per_model=3)
    eager, _ = greedy(core, prompts, NEW_TOKENS)
    runner = _FakeGraphRunner(
        core.models, core.kv_pool, CPU, batch_buckets=(4,), min_width=16, use_graphs=True
    )
    replayed, _ = greedy(core, prompts, NEW_TOKENS, runner)
    assert replayed == eager  # outputs written in place by each replay, rows read after it
    assert runner.captures == 1 and runner.stats()["replays"] == NEW_TOKENS - 1
    core.models["qwen3_moe"].weight_pool._tables = None  # as after a page-in: the slot tables move
    greedy(core, prompts, 3, runner)
    assert runner.captures == 2


def test_graph_count_and_memory_bounds(core):
    rows = {w: [DecodeRow(5, 4 * w - 1, list(range(w)))] for w in (1, 2, 3)}  # widths 1, 2, 4 pages
    runner = _FakeGraphRunner(
        core.models, core.kv_pool, CPU, batch_buckets=(1,), min_width=1, use_graphs=True
    )
    runner.max_graphs = 2
    for w in (1, 2, 3):
        runner.run({"llama": rows[w]})
    assert runner.captures == 3 and runner.stats()["graphs"] == 2  # the least recently used dropped
    broke = _FakeGraphRunner(core.models, core.kv_pool, CPU, batch_buckets=(1,), min_width=1, use_graphs=True)
    broke.graph_memory_bytes = 0  # no budget: every key stays eager
    broke.run({"llama": rows[1]})
    assert broke.captures == 0 and broke.stats()["eager_steps"] == 1


def test_buffers_are_bounded_per_key(core):
    """Keys are combinations of models and buckets: only the `max_entries` most recent keep buffers."""
    rows = {w: [DecodeRow(5, 4 * w - 1, list(range(w)))] for w in (1, 2, 3)}  # widths 1, 2, 4 pages
    runner = StaticDecodeRunner(core.models, core.kv_pool, CPU, batch_buckets=(1,), min_width=1)
    runner.max_entries = 2
    first = runner.run({"llama": rows[1]})["llama"].clone()
    for w in (2, 3):
        runner.run({"llama": rows[w]})
    assert len(runner.entries) == 2 and runner.key_for({"llama": rows[1]}) not in runner.entries
    again = runner.run({"llama": rows[1]})["llama"]  # rebuilt, same result
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    assert len(runner.entries) == 2

"""Decode on persistent buffers padded to a bucket; one CUDA graph per bucket on GPU.

A pure-decode step (every row one new token at the end of its sequence) of a set of
models is copied into buffers that live as long as the runner — token ids, positions,
page tables, sequence lengths, the page and slot each new K/V goes to — padded to a
*bucket*: a batch size from `batch_buckets` per model and a page-table width (a power of
two, at least `min_width` pages). A key is (per model: name and batch bucket; width).
On CUDA the forward over a key's buffers is captured once into a CUDA graph and replayed
(small-batch decode is bound by kernel launches: ~10 per layer per model); on CPU the same
buffers run eagerly, so CPU CI covers bucketing, padding and packing.

Padded rows: token 0 at position 0 with sequence length 1, reading and writing slot 0 of
the model's *scratch page* — one page per model taken from the KV pool on first use and
kept for the runner's life (zeroed), never a request's; unused page-table columns point at
it as well. Rows are independent through
attention, norms, routing and the FFN, so padded rows change no real row; their outputs
are dropped. Greedy tokens equal the eager path's (tests/core/test_static_decode.py).

Graph memory comes out of `graph_memory_bytes`, which `runtime.py` subtracts from the
KV pool's default size *before* sizing it (bytes are reserved, no pages are taken). Every
graph shares one memory pool; each capture's growth of the allocator's reserved bytes is
charged, and a capture that would exceed the budget is not made (that key runs eagerly on
the buffers). At most `max_graphs` graphs are kept (least recently used dropped), and at most
`max_entries` keys' buffers: with many models the keys (which models decode together, at which
buckets) are combinations, and every new one kept its buffers for the process's life.
Graphs bake in addresses: a key's graph is dropped and recaptured when the weights pool's
arena or slot tables, or a KV view, moved since capture.

Legend: B = rows of a batch bucket, W = page-table width in pages, H = hidden size.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from crosspool_sgl.layers.attention.base import AttentionBackend, AttentionMetadata
from crosspool_sgl.mem.kv_pool import KVPool
from crosspool_sgl.models.decoder import DecoderModel

logger = logging.getLogger(__name__)

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_MIN_WIDTH = 16  # pages: 256 tokens at 16 tokens a page

# One forward of several models over their packed inputs (ids, positions, meta, kv) -> hidden [T, H]
# each. The runner calls the decoders only through this, so a lockstep multi-model forward (one
# FFN call per layer across models) can replace `forward_each` without touching this module.
ModelInputs = tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]
ForwardFn = Callable[[Sequence[DecoderModel], Sequence[ModelInputs]], list[torch.Tensor]]


def forward_each(models: Sequence[DecoderModel], inputs: Sequence[ModelInputs]) -> list[torch.Tensor]:
    """Each model's own forward pass over its inputs, in order."""
    return [m.forward(*x) for m, x in zip(models, inputs, strict=True)]


@dataclass(frozen=True)
class DecodeRow:
    """One request's decode token: its id, position and the pages holding its sequence."""

    token: int
    position: int  # = tokens cached before this step; seq_len after it is position + 1
    pages: Sequence[int]


def pick_bucket(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding n rows, or None when n exceeds every bucket."""
    return next((b for b in sorted(buckets) if b >= n), None)


def width_bucket(num_pages: int, min_width: int) -> int:
    """Page-table width for a step needing `num_pages` per row: a power of two >= min_width."""
    width = max(1, min_width)
    while width < num_pages:
        width *= 2
    return width


class ModelSlice:
    """One model's persistent buffers inside a key: B rows, W pages a row."""

    def __init__(self, model: DecoderModel, kv: torch.Tensor, scratch: int, batch: int, width: int) -> None:
        dev = kv.device
        self.model = model  # the decoder, or a shallow copy with graph-safe attention (see attention_for)
        self.kv = kv
        self.scratch = scratch
        self.batch, self.width = batch, width
        self.ids = torch.zeros(batch, dtype=torch.int64, device=dev)  # [B]
        self.positions = torch.zeros(batch, dtype=torch.int64, device=dev)  # [B]
        page_tokens = kv.shape[3]
        # seq_lens_cpu holds the capacity, not the lengths: backends take shapes from it (the torch
        # decode gathers max(seq_lens_cpu) worth of pages), and shapes must not change between steps.
        self.meta = AttentionMetadata(
            page_table=torch.zeros(batch, width, dtype=torch.int32, device=dev),  # [B, W]
            seq_lens=torch.ones(batch, dtype=torch.int32, device=dev),  # [B]
            extend_lens=torch.ones(batch, dtype=torch.int32, device=dev),  # [B]
            write_pages=torch.zeros(batch, dtype=torch.int64, device=dev),  # [B]
            write_slots=torch.zeros(batch, dtype=torch.int64, device=dev),  # [B]
            seq_lens_cpu=[width * page_tokens] * batch,
            extend_lens_cpu=[1] * batch,
            page_tokens=page_tokens,
        )
        self.fill([])

    def fill(self, rows: Sequence[DecodeRow]) -> tuple[list[list[int]], list[int]]:
        """Copy `rows` into the buffers, padding the rest; returns the host (pages, seq_lens) of all B."""
        pt = self.meta.page_tokens
        pad = DecodeRow(0, 0, [self.scratch])
        padded = [*rows, *([pad] * (self.batch - len(rows)))]
        # Unused columns hold the scratch page too: a backend that gathers the whole width (the torch
        # decode) then reads only mapped memory, even where page 0's chunk is unmapped (CUDA VMM).
        table = torch.full((self.batch, self.width), self.scratch, dtype=torch.int32)
        pages: list[list[int]] = []
        for i, r in enumerate(padded):
            used = list(r.pages[: r.position // pt + 1])
            table[i, : len(used)] = torch.tensor(used, dtype=torch.int32)
            pages.append(used)
        seq_lens = [r.position + 1 for r in padded]
        ints = torch.tensor(
            [
                [r.token for r in padded],
                [r.position for r in padded],
                [r.pages[r.position // pt] for r in padded],
                [r.position % pt for r in padded],
                seq_lens,
            ],
            dtype=torch.int64,
        )  # [5, B]
        ints = ints.to(self.ids.device, non_blocking=True)
        self.ids.copy_(ints[0])
        self.positions.copy_(ints[1])
        self.meta.write_pages.copy_(ints[2])
        self.meta.write_slots.copy_(ints[3])
        self.meta.seq_lens.copy_(ints[4])
        self.meta.page_table.copy_(table, non_blocking=True)
        # values derived from the old contents (rope cos/sin, decode masks) belong to the last step;
        # inside a CUDA graph they are recomputed on replay, eagerly they must be rebuilt
        self.meta.step_cache.clear()
        return pages, seq_lens

    def inputs(self) -> ModelInputs:
        return self.ids, self.positions, self.meta, self.kv


@dataclass(frozen=True)
class _Epoch:
    """What a captured graph read by address: a move of any of these invalidates it."""

    tables: tuple[object, ...]
    ptrs: tuple[int, ...]


class _Entry:
    """A key's buffers, and its graph and output tensors once captured."""

    def __init__(self, slices: list[ModelSlice]) -> None:
        self.slices = slices
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: list[torch.Tensor] | None = None  # [B, H] per slice, written by each replay
        self.epoch: _Epoch | None = None
        self.graph_failed = False


Key = tuple[tuple[tuple[str, int], ...], int]


class StaticDecodeRunner:
    """Runs pure-decode steps on per-key persistent buffers, replaying CUDA graphs where it can."""

    def __init__(
        self,
        models: dict[str, DecoderModel],
        kv_pool: KVPool,
        device: torch.device,
        forward_fn: ForwardFn = forward_each,
        batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
        min_width: int = DEFAULT_MIN_WIDTH,
        use_graphs: bool | None = None,
        graph_memory_bytes: int = 1 << 30,
        max_graphs: int = 128,
        max_entries: int = 512,
    ) -> None:
        self.models = models
        self.kv_pool = kv_pool
        self.device = device
        self.forward_fn = forward_fn
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.min_width = min_width
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self.graph_memory_bytes = graph_memory_bytes
        self.max_graphs = max_graphs
        self.max_entries = max_entries
        self.graph_bytes = 0  # charged so far against graph_memory_bytes
        self.entries: OrderedDict[Key, _Entry] = OrderedDict()  # LRU order
        self.num_replays = 0
        self.num_eager = 0
        self._scratch: dict[str, int] = {}
        self._refused: set[Key] = set()
        self._pool = None  # one CUDA-graph memory pool shared by every graph, made at first capture
        self._lock = threading.Lock()  # the prefill lane may call run() from a second thread

    # ---- the step -----------------------------------------------------------------------------
    def key_for(self, rows_by_model: dict[str, Sequence[DecodeRow]]) -> Key | None:
        """The bucket key of a step, or None when some model's rows exceed every batch bucket."""
        pt = self.kv_pool.page_tokens
        need = max((r.position // pt + 1 for rows in rows_by_model.values() for r in rows), default=0)
        if need == 0:
            return None
        parts = []
        for name in sorted(rows_by_model):
            bucket = pick_bucket(len(rows_by_model[name]), self.batch_buckets)
            if bucket is None:
                return None
            parts.append((name, bucket))
        return tuple(parts), width_bucket(need, self.min_width)

    def run(self, rows_by_model: dict[str, Sequence[DecodeRow]]) -> dict[str, torch.Tensor] | None:
        """Hidden states [n, H] of each model's real rows (valid until the next run), or None when
        the step does not fit (too many rows, no scratch page, the buffers busy): run it eagerly."""
        key = self.key_for(rows_by_model)
        if key is None or not self._lock.acquire(blocking=False):
            return None
        try:
            entry = self._entry(key)
            if entry is None:
                return None
            if self.use_graphs:
                self._ensure_graph(key, entry)  # before filling: capture runs on padding
            for s in entry.slices:
                _fill_and_plan(s, rows_by_model[s.model.name])
            outputs = self._execute(entry)
            return {
                s.model.name: out[: len(rows_by_model[s.model.name])]
                for s, out in zip(entry.slices, outputs, strict=True)
            }
        finally:
            self._lock.release()

    def capture(self, names: Sequence[str], batch: int, width: int | None = None) -> bool:
        """Build (and on CUDA capture) the key of `names` at `batch` rows each: start-up warming."""
        key: Key = (tuple((n, batch) for n in sorted(names)), width or width_bucket(1, self.min_width))
        with self._lock:
            entry = self._entry(key)
            if entry is None:
                return False
            if self.use_graphs:
                self._ensure_graph(key, entry)
            return entry.graph is not None or not self.use_graphs

    def _execute(self, entry: _Entry) -> list[torch.Tensor]:
        if entry.graph is not None:
            entry.graph.replay()
            self.num_replays += 1
            return entry.outputs
        self.num_eager += 1
        return self._forward(entry)

    def _forward(self, entry: _Entry) -> list[torch.Tensor]:
        return self.forward_fn([s.model for s in entry.slices], [s.inputs() for s in entry.slices])

    # ---- buffers ------------------------------------------------------------------------------
    def _entry(self, key: Key) -> _Entry | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            return entry
        if key in self._refused:
            return None
        parts, width = key
        slices = []
        for name, batch in parts:
            scratch = self._scratch_page(name)
            if scratch is None:  # the pool is full now; try again on a later step
                return None
            try:
                twin = attention_for(self.models[name], batch, width, self.kv_pool.page_tokens)
            except Exception:  # e.g. a FlashInfer without these head sizes: the key runs eagerly
                logger.exception("static decode: no graph-safe attention for %s; running it eagerly", key)
                self._refused.add(key)
                return None
            slices.append(ModelSlice(twin, self.kv_pool.kv_view(name), scratch, batch, width))
        entry = self.entries[key] = _Entry(slices)
        while len(self.entries) > self.max_entries:  # least recently used first (its graph with it)
            self.entries.popitem(last=False)
        return entry

    def _scratch_page(self, name: str) -> int | None:
        """The model's padding page: taken from the pool once, zeroed (padded rows read slot 0)."""
        if name not in self._scratch:
            pages = self.kv_pool.alloc(name, 1, privileged=True)
            if pages is None:
                return None
            self.kv_pool.kv_view(name)[pages[0]].zero_()
            self._scratch[name] = pages[0]
        return self._scratch[name]

    # ---- graphs -------------------------------------------------------------------------------
    def _epoch(self, entry: _Entry) -> _Epoch:
        pools = {id(s.model.weight_pool): s.model.weight_pool for s in entry.slices}.values()
        tables = tuple(p.tables() for p in pools)
        ptrs = tuple(p.arena.data_ptr() for p in pools) + tuple(
            self.kv_pool.kv_view(s.model.name).data_ptr() for s in entry.slices
        )
        return _Epoch(tables, ptrs)

    def _ensure_graph(self, key: Key, entry: _Entry) -> None:
        if entry.graph is not None:
            now = self._epoch(entry)
            if all(a is b for a, b in zip(now.tables, entry.epoch.tables, strict=True)) and (
                now.ptrs == entry.epoch.ptrs
            ):
                return
            logger.info("static decode: weights or KV moved, recapturing %s", key)
            entry.graph, entry.outputs = None, None
        if entry.graph_failed or self.graph_bytes >= self.graph_memory_bytes:
            return
        while sum(e.graph is not None for e in self.entries.values()) >= self.max_graphs:
            self._drop_oldest_graph(key)
        self._capture(key, entry)

    def _drop_oldest_graph(self, keep: Key) -> None:
        for k, e in self.entries.items():
            if e.graph is not None and k != keep:
                e.graph, e.outputs = None, None
                return

    def _capture(self, key: Key, entry: _Entry) -> None:
        """Warm up on a side stream (Triton compiles, cuBLAS picks algorithms), then capture.

        The buffers hold padding here (every row on the scratch page), so warm-up and capture
        write no request's KV."""
        for s in entry.slices:
            _fill_and_plan(s, [])
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        before = torch.cuda.memory_reserved(self.device)
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._forward(entry)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                outputs = self._forward(entry)
        except Exception:  # an op that cannot be captured: this key stays eager, visibly
            logger.exception("static decode: CUDA graph capture failed for %s; it runs eagerly", key)
            entry.graph_failed = True
            torch.cuda.synchronize(self.device)
            return
        self.graph_bytes += max(0, torch.cuda.memory_reserved(self.device) - before)
        entry.graph, entry.outputs, entry.epoch = graph, outputs, self._epoch(entry)
        logger.info("static decode: captured %s (graph memory %.1f MiB)", key, self.graph_bytes / 2**20)

    def stats(self) -> dict[str, int]:
        return {
            "keys": len(self.entries),
            "graphs": sum(e.graph is not None for e in self.entries.values()),
            "replays": self.num_replays,
            "eager_steps": self.num_eager,
            "graph_bytes": self.graph_bytes,
        }


def _fill_and_plan(s: ModelSlice, rows: Sequence[DecodeRow]) -> None:
    """Rows into the slice's buffers; graph-safe FlashInfer attention plans on the host from them."""
    pages, seq_lens = s.fill(rows)
    plan = getattr(s.model.attn_backend, "plan", None)
    if plan is not None:
        plan(pages, seq_lens)


def attention_for(model: DecoderModel, batch: int, width: int, page_tokens: int) -> DecoderModel:
    """The model with attention that is safe on fixed buffers (and inside a CUDA graph).

    The torch and Triton backends read only device tensors and the capacity in seq_lens_cpu,
    so the model is returned as it is. FlashInfer plans on the host per step: a shallow copy of
    the model (weights shared) gets FlashInfer's CUDA-graph decode wrappers over fixed buffers,
    planned before each run; MLA models get the torch backend there (not captured by FlashInfer).
    """
    backend = model.attn_backend
    if backend.name != "flashinfer":
        return model
    graph_attn: AttentionBackend
    if model.config.mla is not None:
        from crosspool_sgl.layers.attention.torch_backend import TorchAttentionBackend

        graph_attn = TorchAttentionBackend()
    else:
        from crosspool_sgl.layers.attention.flashinfer_graph import FlashInferGraphDecode

        graph_attn = FlashInferGraphDecode(backend, model, batch, width, page_tokens)
    twin = copy.copy(model)
    twin.attn_backend = graph_attn
    return twin

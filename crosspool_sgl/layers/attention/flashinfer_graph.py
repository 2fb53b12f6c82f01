"""FlashInfer decode attention for one static-decode bucket, safe inside a CUDA graph.

FlashInfer's `BatchDecodeWithPagedKVCacheWrapper(use_cuda_graph=True, ...)` reads its
indptr / indices / last-page-length from buffers fixed at construction; `plan()` runs on the
host *outside* the graph before each replay and rewrites them (and the split schedule in
the workspace), so one captured graph serves every step of a bucket. One wrapper per
distinct sliding window of the model (window w -> FlashInfer window_left w - 1); layers
with attention sinks (gpt-oss) run the torch decode, which reads only device tensors and
the bucket's capacity and is capturable as well.

Not yet run on a GPU in this project (no GPU was lent when it was written); tests/gpu
compares graph replay with the eager path when one is.

Legend: B = rows of the bucket, W = page-table width (pages), Hq/Hkv = heads, D = head dim.
"""

from __future__ import annotations

import torch

from crosspool_sgl.layers.attention.base import AttentionBackend
from crosspool_sgl.layers.attention.torch_backend import TorchAttentionBackend


class FlashInferGraphDecode(AttentionBackend):
    name = "flashinfer_graph"

    def __init__(self, backend, model, batch: int, width: int, page_tokens: int) -> None:
        """`backend`: the model's FlashInferAttentionBackend (its workspace is shared); `model`:
        the decoder, for head counts, windows, scale and dtype."""
        cfg = model.config
        flashinfer = backend._flashinfer
        dev = backend.workspace.device
        self.num_qo_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.dtype = model.weights.embed.dtype
        self.scale = model.scale
        self.indptr = torch.zeros(batch + 1, dtype=torch.int32, device=dev)  # [B + 1]
        self.indices = torch.zeros(batch * width, dtype=torch.int32, device=dev)  # [B * W]
        self.last_page_len = torch.ones(batch, dtype=torch.int32, device=dev)  # [B]
        # FlashInfer's decode kernel covers small GQA groups; larger ones take its tensor-core path.
        tensor_cores = self.num_qo_heads // self.num_kv_heads > 4
        windows = {(w - 1 if w else -1) for w in cfg.sliding_windows}
        self.wrappers = {
            w: flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                backend.workspace,
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=tensor_cores,
                paged_kv_indptr_buffer=self.indptr,
                paged_kv_indices_buffer=self.indices,
                paged_kv_last_page_len_buffer=self.last_page_len,
            )
            for w in sorted(windows)
        }
        self.page_tokens = page_tokens
        self._torch = TorchAttentionBackend()

    def plan(self, pages: list[list[int]], seq_lens: list[int]) -> None:
        """Host-side planning for the next run (all B rows, padded ones included)."""
        pt = self.page_tokens
        dev = self.indptr.device
        counts = [-(-n // pt) for n in seq_lens]
        indptr = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
        indices = torch.tensor(
            [p for row, c in zip(pages, counts, strict=True) for p in row[:c]], dtype=torch.int32
        )
        last = torch.tensor(
            [n - (c - 1) * pt for n, c in zip(seq_lens, counts, strict=True)], dtype=torch.int32
        )
        for window_left, wrapper in self.wrappers.items():
            wrapper.plan(
                indptr.to(dev),
                indices.to(dev),
                last.to(dev),
                self.num_qo_heads,
                self.num_kv_heads,
                self.head_dim,
                pt,
                window_left=window_left,
                q_data_type=self.dtype,
                kv_data_type=self.dtype,
                sm_scale=self.scale,
            )

    def forward(self, q, k, v, kv, layer, meta, scale, sliding_window, sinks=None, value_dim=None):
        if sinks is not None or v is None:
            return self._torch.forward(q, k, v, kv, layer, meta, scale, sliding_window, sinks, value_dim)
        self.write_kv(kv, layer, meta, k, v)
        wrapper = self.wrappers[sliding_window - 1 if sliding_window else -1]
        return wrapper.run(q.contiguous(), (kv[:, layer, 0], kv[:, layer, 1]))  # [B, Hq, D]

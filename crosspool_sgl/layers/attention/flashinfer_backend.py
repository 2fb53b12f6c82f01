"""FlashInfer paged attention (GPU): one batch-prefill wrapper serves prefill, extend and decode.

Our per-layer K and V are `kv[:, layer, 0]` / `kv[:, layer, 1]`, i.e. FlashInfer's
NHD paged layout [N, PT, Hkv, D] with a page stride of L*2*PT*Hkv*D elements
(the pages of all layers are interleaved in the arena), passed as a (k, v) tuple.
Plans depend on the window (HF window w = FlashInfer window_left w - 1), so one
wrapper is planned per distinct window per forward pass.

One-plane (MLA latent) views use FlashInfer's MLA paged kernel
(`flashinfer.mla.BatchMLAPagedAttentionWrapper`) on the absorbed query, split
into its latent part [T, Hq, R] and rope part [T, Hq, r]; the cache is passed as
the latent and rope column slices of plane 0. Attention sinks (gpt-oss) are not
in FlashInfer's paged prefill API we target, so those layers run the torch backend.

Not yet run on a GPU in this project (no GPU was lent when it was written): it
follows FlashInfer 0.7's documented API; tests/gpu compares it with the torch
backend when a GPU is present.
"""

from __future__ import annotations

import torch

from crosspool_sgl.layers.attention.base import AttentionBackend, AttentionMetadata
from crosspool_sgl.layers.attention.torch_backend import TorchAttentionBackend

_WORKSPACE_BYTES = 128 << 20


class FlashInferAttentionBackend(AttentionBackend):
    name = "flashinfer"

    def __init__(self, device: torch.device) -> None:
        import flashinfer

        self._flashinfer = flashinfer
        self.workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._wrappers: dict[int, object] = {}
        self._planned: dict[int, tuple] = {}
        self._meta: AttentionMetadata | None = None
        self._mla_wrapper = None
        self._mla_planned: tuple | None = None
        self._torch = TorchAttentionBackend()

    def init_forward(self, meta: AttentionMetadata) -> None:
        self._meta = meta
        self._planned.clear()
        self._mla_planned = None

    def _csr(self, meta: AttentionMetadata, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qo_indptr, kv_indptr, kv_indices) of the step, int32 on `device`."""
        num_pages = [-(-n // meta.page_tokens) for n in meta.seq_lens_cpu]
        indices = torch.cat([meta.page_table[i, :n] for i, n in enumerate(num_pages)]).to(torch.int32)
        return (
            _prefix_sum(meta.extend_lens_cpu).to(device),
            _prefix_sum(num_pages).to(device),
            indices.to(device),
        )

    def _forward_mla(self, q, k, kv, layer, meta: AttentionMetadata, scale, value_dim: int):
        """q [T, Hq, R+r] absorbed, k [T, 1, R+r] latents -> [T, Hq, R]."""
        self.write_kv(kv, layer, meta, k, None)
        rank = value_dim
        if self._mla_wrapper is None:
            self._mla_wrapper = self._flashinfer.mla.BatchMLAPagedAttentionWrapper(self.workspace)
        key = (q.shape[1], kv.shape[-1], scale)
        if self._mla_planned != key:
            qo_indptr, kv_indptr, kv_indices = self._csr(meta, q.device)
            self._mla_wrapper.plan(
                qo_indptr,
                kv_indptr,
                kv_indices,
                meta.seq_lens.to(torch.int32),
                q.shape[1],
                rank,
                kv.shape[-1] - rank,
                meta.page_tokens,
                True,  # causal
                scale,
                q.dtype,
                kv.dtype,
            )
            self._mla_planned = key
        plane = kv[:, layer, 0, :, 0]  # [N, PT, R+r]
        return self._mla_wrapper.run(
            q[..., :rank].contiguous(), q[..., rank:].contiguous(), plane[..., :rank], plane[..., rank:]
        )

    def _wrapper(self, q, kv, meta: AttentionMetadata, scale: float, window_left: int):
        key = (q.shape[1], kv.shape[-2], kv.shape[-1], scale)
        wrapper = self._wrappers.get(window_left)
        if wrapper is None:
            wrapper = self._flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD")
            self._wrappers[window_left] = wrapper
        if self._planned.get(window_left) != key:
            num_pages = [-(-n // meta.page_tokens) for n in meta.seq_lens_cpu]
            device = q.device
            indptr = _prefix_sum(num_pages)
            indices = torch.cat([meta.page_table[i, :n] for i, n in enumerate(num_pages)]).to(torch.int32)
            last = [n - (p - 1) * meta.page_tokens for n, p in zip(meta.seq_lens_cpu, num_pages, strict=True)]
            qo_indptr = _prefix_sum(meta.extend_lens_cpu)
            wrapper.plan(
                qo_indptr.to(device),
                indptr.to(device),
                indices.to(device),
                torch.tensor(last, dtype=torch.int32, device=device),
                q.shape[1],
                kv.shape[-2],
                kv.shape[-1],
                meta.page_tokens,
                causal=True,
                sm_scale=scale,
                window_left=window_left,
                q_data_type=q.dtype,
                kv_data_type=kv.dtype,
            )
            self._planned[window_left] = key
        return wrapper

    def forward(self, q, k, v, kv, layer, meta, scale, sliding_window, sinks=None, value_dim=None):
        if sinks is not None or (v is None and sliding_window):
            return self._torch.forward(q, k, v, kv, layer, meta, scale, sliding_window, sinks, value_dim)
        if v is None:
            return self._forward_mla(q, k, kv, layer, meta, scale, value_dim)
        self.write_kv(kv, layer, meta, k, v)
        window_left = sliding_window - 1 if sliding_window else -1
        wrapper = self._wrapper(q, kv, meta, scale, window_left)
        return wrapper.run(q.contiguous(), (kv[:, layer, 0], kv[:, layer, 1]))


def _prefix_sum(counts: list[int]) -> torch.Tensor:
    """[0, c0, c0+c1, ...] as int32: FlashInfer's CSR indptr."""
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)

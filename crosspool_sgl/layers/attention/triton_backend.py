"""GPU fallback when FlashInfer is missing: the Triton paged decode kernel, torch for extend."""

from __future__ import annotations

from crosspool_sgl.layers.attention.torch_backend import TorchAttentionBackend


class TritonAttentionBackend(TorchAttentionBackend):
    name = "triton"

    def forward(self, q, k, v, kv, layer, meta, scale, sliding_window):
        if not meta.is_decode:
            return super().forward(q, k, v, kv, layer, meta, scale, sliding_window)
        from kernels.paged_decode_attention import paged_decode_attention

        self.write_kv(kv, layer, meta, k, v)
        return paged_decode_attention(
            q, kv[:, layer, 0], kv[:, layer, 1], meta.page_table, meta.seq_lens, scale, sliding_window or 0
        )

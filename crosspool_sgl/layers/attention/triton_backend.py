"""GPU fallback when FlashInfer is missing: the Triton paged decode kernel, torch for extend.

The decode kernel reads separate K and V planes without sinks, so one-plane (MLA latent)
views and attention sinks (gpt-oss) take the torch path for every step.
"""

from __future__ import annotations

from crosspool_sgl.layers.attention.torch_backend import TorchAttentionBackend


class TritonAttentionBackend(TorchAttentionBackend):
    name = "triton"

    def forward(self, q, k, v, kv, layer, meta, scale, sliding_window, sinks=None, value_dim=None):
        if not meta.is_decode or v is None or sinks is not None:
            return super().forward(q, k, v, kv, layer, meta, scale, sliding_window, sinks, value_dim)
        from kernels.paged_decode_attention import paged_decode_attention

        self.write_kv(kv, layer, meta, k, v)
        return paged_decode_attention(
            q, kv[:, layer, 0], kv[:, layer, 1], meta.page_table, meta.seq_lens, scale, sliding_window or 0
        )

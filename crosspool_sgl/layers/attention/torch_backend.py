"""Attention with plain torch: gather the pages, then scaled_dot_product_attention.

Runs everywhere (CPU and GPU) and is the CPU default. Decode steps are batched
into one SDPA call over padded gathers; prefill/extend runs one SDPA per
sequence (their lengths differ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crosspool_sgl.layers.attention.base import AttentionBackend, AttentionMetadata


def attention_mask(q_pos: torch.Tensor, k_len: int, sliding_window: int | None) -> torch.Tensor:
    """Boolean [Tq, Tk] mask: causal, and only the last `sliding_window` keys when set."""
    k_pos = torch.arange(k_len, device=q_pos.device)
    mask = k_pos[None, :] <= q_pos[:, None]
    if sliding_window:
        mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return mask


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    thread_safe = True

    def forward(self, q, k, v, kv, layer, meta, scale, sliding_window):
        self.write_kv(kv, layer, meta, k, v)
        if meta.is_decode:
            return self._decode(q, kv, layer, meta, scale, sliding_window)
        out = torch.empty_like(q)
        start = 0
        for i, (total, new) in enumerate(zip(meta.seq_lens_cpu, meta.extend_lens_cpu, strict=True)):
            num_pages = -(-total // meta.page_tokens)
            pages = meta.page_table[i, :num_pages].long()
            keys = kv[pages, layer, 0].flatten(0, 1)[:total]  # [S, Hkv, D]
            values = kv[pages, layer, 1].flatten(0, 1)[:total]
            q_pos = torch.arange(total - new, total, device=q.device)
            mask = attention_mask(q_pos, total, sliding_window)
            out[start : start + new] = self._sdpa(q[start : start + new], keys, values, mask, scale)
            start += new
        return out

    def _decode(self, q, kv, layer, meta: AttentionMetadata, scale, sliding_window):
        max_pages = -(-max(meta.seq_lens_cpu) // meta.page_tokens)
        pages = meta.page_table[:, :max_pages].long()  # [B, P]
        keys = kv[pages, layer, 0].flatten(1, 2)  # [B, P*PT, Hkv, D]
        values = kv[pages, layer, 1].flatten(1, 2)
        q_pos = (meta.seq_lens - 1).long()  # [B]
        k_pos = torch.arange(keys.shape[1], device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [B, S]
        if sliding_window:
            mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
        qh = q.unsqueeze(2)  # [B, Hq, 1, D]
        kh, vh = keys.transpose(1, 2), values.transpose(1, 2)  # [B, Hkv, S, D]
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=kh.shape[1] != qh.shape[1]
        )
        return out.squeeze(2)

    @staticmethod
    def _sdpa(q, keys, values, mask, scale) -> torch.Tensor:
        # 4-D inputs with the KV heads repeated: on CPU, 3-D or `enable_gqa` inputs take SDPA's math
        # path (bmm + softmax + mask checks), 4-D ones its flash kernel — measured 3.5-5x faster for a
        # 256-token chunk at 1k-10k context (4 heads, D=16), which bounds what a prefill chunk costs.
        group = q.shape[1] // keys.shape[1]
        qh = q.transpose(0, 1)[None]  # [1, Hq, Tq, D]
        kh = keys.transpose(0, 1).repeat_interleave(group, 0)[None]  # [1, Hq, S, D]
        vh = values.transpose(0, 1).repeat_interleave(group, 0)[None]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[None, None], scale=scale)
        return out[0].transpose(0, 1)

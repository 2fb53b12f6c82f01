"""Attention with plain torch: gather the pages, then scaled_dot_product_attention.

Runs everywhere (CPU and GPU) and is the CPU default. Decode steps are batched
into one SDPA call over padded gathers; prefill/extend runs one SDPA per
sequence (their lengths differ). One-plane (MLA latent) views read their values
from the key plane; attention sinks (gpt-oss) join the softmax as one extra
all-zero key whose logit is the sink, passed through SDPA's additive mask, so the
sink takes its share of the probability mass and adds nothing to the output.

Legend: T = new tokens, B = sequences, S = keys, H = heads, D = head dim, Dv = value width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crosspool_sgl.layers.attention.base import AttentionBackend, AttentionMetadata, kv_planes


def attention_mask(q_pos: torch.Tensor, k_len: int, sliding_window: int | None) -> torch.Tensor:
    """Boolean [Tq, Tk] mask: causal, and only the last `sliding_window` keys when set."""
    k_pos = torch.arange(k_len, device=q_pos.device)
    mask = k_pos[None, :] <= q_pos[:, None]
    if sliding_window:
        mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return mask


def sdpa(
    q: torch.Tensor,  # [..., Hq, Tq, D]
    k: torch.Tensor,  # [..., Hkv, S, D]
    v: torch.Tensor,  # [..., Hkv, S, Dv]
    mask: torch.Tensor,  # bool, broadcastable to [..., Hq, Tq, S]
    scale: float,
    sinks: torch.Tensor | None,  # [Hq]
) -> torch.Tensor:  # [..., Hq, Tq, Dv]
    gqa = k.shape[-3] != q.shape[-3]
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    sink = sinks.to(q.dtype)[:, None, None].expand(*q.shape[:-1], 1)  # [..., Hq, Tq, 1]
    bias = torch.cat((bias.expand(*q.shape[:-1], bias.shape[-1]), sink), dim=-1)  # [..., Hq, Tq, S+1]
    k = F.pad(k, (0, 0, 0, 1))  # the sink's key: zeros, so its logit is just the bias
    v = F.pad(v, (0, 0, 0, 1))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=gqa)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    thread_safe = True

    def forward(
        self, q, k, v, kv, layer, meta, scale, sliding_window, sinks=None, value_dim=None
    ) -> torch.Tensor:
        if v is None:
            self.write_kv(kv, layer, meta, k, v)
        else:  # K and V of the new tokens in one indexed write (a decode step is bound by op count)
            to_pages, to_planes, to_slots = self._write_index(meta)
            kv[to_pages, layer, to_planes, to_slots] = torch.cat((k, v))
        return self.attend(q, kv, layer, meta, scale, sliding_window, sinks, value_dim)

    def attend(self, q, kv, layer, meta, scale, sliding_window, sinks=None, value_dim=None) -> torch.Tensor:
        """`forward` once the new tokens' K/V are in `kv` (the lockstep forward writes several
        models' at once, layers/attention/shared_kv.py)."""
        if meta.is_decode:
            return self._decode(q, kv, layer, meta, scale, sliding_window, sinks, value_dim)
        out = q.new_empty(*q.shape[:2], value_dim or q.shape[-1])  # [T, Hq, Dv]
        start = 0
        for i, (total, new) in enumerate(zip(meta.seq_lens_cpu, meta.extend_lens_cpu, strict=True)):
            num_pages = -(-total // meta.page_tokens)
            pages = meta.page_table[i, :num_pages].long()
            keys, values = kv_planes(kv, pages, layer, value_dim)
            keys, values = keys.flatten(0, 1)[:total], values.flatten(0, 1)[:total]  # [S, Hkv, D|Dv]
            q_pos = torch.arange(total - new, total, device=q.device)
            mask = attention_mask(q_pos, total, sliding_window)
            # 4-D with the KV heads repeated: on CPU, 3-D or `enable_gqa` inputs take SDPA's math path
            # (bmm + softmax + mask checks), 4-D ones its flash kernel — measured 3.5-5x faster for a
            # 256-token chunk at 1k-10k context (4 heads, D=16), which bounds what a prefill chunk costs.
            group = q.shape[1] // keys.shape[1]
            qh = q[start : start + new].transpose(0, 1)[None]  # [1, Hq, T, D]
            kh = keys.transpose(0, 1).repeat_interleave(group, 0)[None]  # [1, Hq, S, D]
            vh = values.transpose(0, 1).repeat_interleave(group, 0)[None]  # [1, Hq, S, Dv]
            out[start : start + new] = sdpa(qh, kh, vh, mask, scale, sinks)[0].transpose(0, 1)
            start += new
        return out

    def _decode(self, q, kv, layer, meta: AttentionMetadata, scale, sliding_window, sinks, value_dim):
        pages = self._decode_pages_and_mask(meta, sliding_window, q.dtype)[0]
        keys, values = kv_planes(kv, pages, layer, value_dim)
        keys, values = keys.flatten(1, 2), values.flatten(1, 2)  # [B, P*PT, Hkv, D|Dv]
        return self.attend_gathered(q, keys, values, meta, scale, sliding_window, sinks)

    def attend_gathered(self, q, keys, values, meta: AttentionMetadata, scale, sliding_window, sinks=None):
        """A decode step's attention over keys/values [B, P*PT, Hkv, D|Dv] already gathered from the
        pages `_decode_pages_and_mask` names (the lockstep forward gathers several models' at once)."""
        _, mask, additive = self._decode_pages_and_mask(meta, sliding_window, q.dtype)
        if sinks is None:  # SDPA turns a bool mask into this additive one on every call
            return self.attend_rows(q, keys, values, additive, scale)
        qh = q.unsqueeze(2)  # [B, Hq, 1, D]
        kh, vh = keys.transpose(1, 2), values.transpose(1, 2)  # [B, Hkv, S, D|Dv]
        return sdpa(qh, kh, vh, mask, scale, sinks).squeeze(2)

    @staticmethod
    def attend_rows(q, keys, values, additive: torch.Tensor, scale: float) -> torch.Tensor:
        """Decode attention of q [B, Hq, D] over keys/values [B, S, Hkv, D|Dv] with an additive mask
        [B, 1, 1, S] (no sinks): one SDPA call whose batch rows are independent, so rows of several
        models' decode steps stacked give each row the values of its own model's call (the lockstep
        forward's grouped attention, models/lockstep.py)."""
        kh, vh = keys.transpose(1, 2), values.transpose(1, 2)  # [B, Hkv, S, D|Dv]
        return sdpa(q.unsqueeze(2), kh, vh, additive, scale, None).squeeze(2)  # [B, Hq, Dv]

    @staticmethod
    def decode_mask(meta: AttentionMetadata, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """The additive decode mask [B, 1, 1, S] `attend_gathered` applies (built once per step)."""
        return TorchAttentionBackend._decode_pages_and_mask(meta, sliding_window, dtype)[2]

    @staticmethod
    def _write_index(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pages, planes, slots) [2T] each addressing the new tokens' K (plane 0) then V (plane 1);
        the same for every layer, so built once per step."""
        cached = meta.step_cache.get("kv_write")
        if cached is None:
            pages, slots = meta.write_pages, meta.write_slots
            planes = (torch.arange(2 * pages.shape[0], device=pages.device) >= pages.shape[0]).long()
            cached = torch.cat((pages, pages)), planes, torch.cat((slots, slots))
            meta.step_cache["kv_write"] = cached
        return cached

    @staticmethod
    def plan_decode_many(metas: list[AttentionMetadata], dtype: torch.dtype) -> torch.Tensor | None:
        """`_decode_pages_and_mask` (no sliding window) of several decode steps' metadata in one
        pass — the lockstep forward's models: one page list and one mask [sum B, max S] whose
        rows and first S columns are each model's (the same values), not one build per model.
        Returns the page ids [sum B * P] (each model's [B, P] row-major, in order) when it planned
        every metadata, else None."""
        key = ("decode", None, dtype)
        todo = [m for m in metas if key not in m.step_cache]
        if len(todo) < 2:
            return None
        num_pages = [-(-max(m.seq_lens_cpu) // m.page_tokens) for m in todo]
        width = max(p * m.page_tokens for p, m in zip(num_pages, todo, strict=True))
        pages = torch.cat([m.page_table[:, :p].reshape(-1) for m, p in zip(todo, num_pages, strict=True)])
        pages = pages.long()  # [sum B * P]
        q_pos = torch.cat([m.seq_lens for m in todo]).long() - 1  # [sum B]
        k_pos = torch.arange(width, device=q_pos.device)
        mask = (k_pos[None, :] <= q_pos[:, None])[:, None, None, :]  # [sum B, 1, 1, max S]
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        start = at = 0
        for m, p in zip(todo, num_pages, strict=True):
            b, s = m.page_table.shape[0], p * m.page_tokens
            rows, add = mask.narrow(0, start, b), additive.narrow(0, start, b)
            if s != width:
                rows, add = rows.narrow(3, 0, s), add.narrow(3, 0, s)
            m.step_cache[key] = pages.narrow(0, at, b * p).view(b, p), rows, add
            start, at = start + b, at + b * p
        return pages if len(todo) == len(metas) else None

    @staticmethod
    def _decode_pages_and_mask(meta: AttentionMetadata, sliding_window: int | None, dtype: torch.dtype):
        """Page ids [B, P], mask [B, 1, 1, S] and the same mask as 0 / -inf in `dtype` of a decode step:
        the same for every layer, so built once per step and window and kept in `meta.step_cache`."""
        key = ("decode", sliding_window, dtype)
        cached = meta.step_cache.get(key)
        if cached is not None:
            return cached
        max_pages = -(-max(meta.seq_lens_cpu) // meta.page_tokens)
        pages = meta.page_table[:, :max_pages].long()  # [B, P]
        q_pos = (meta.seq_lens - 1).long()  # [B]
        k_pos = torch.arange(max_pages * meta.page_tokens, device=pages.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [B, S]
        if sliding_window:
            mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
        mask = mask[:, None, None, :]
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        meta.step_cache[key] = pages, mask, additive
        return meta.step_cache[key]

"""Attention backends over the paged KV pool; `create_attention_backend` picks one per device."""

from __future__ import annotations

from crosspool_sgl.layers.attention.base import AttentionBackend, AttentionMetadata
from crosspool_sgl.layers.attention.selector import create_attention_backend

__all__ = ["AttentionBackend", "AttentionMetadata", "create_attention_backend"]

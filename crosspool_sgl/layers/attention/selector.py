"""Choose an attention backend by device and what is importable."""

from __future__ import annotations

import importlib.util

import torch

from crosspool_sgl.layers.attention.base import AttentionBackend


def create_attention_backend(device: torch.device, name: str = "auto") -> AttentionBackend:
    """auto: FlashInfer on CUDA when installed, else Triton on CUDA, torch on CPU."""
    if name == "auto":
        if device.type != "cuda":
            name = "torch"
        elif importlib.util.find_spec("flashinfer") is not None:
            name = "flashinfer"
        else:
            name = "triton"
    if name == "torch":
        from crosspool_sgl.layers.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from crosspool_sgl.layers.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    if name == "flashinfer":
        from crosspool_sgl.layers.attention.flashinfer_backend import FlashInferAttentionBackend

        return FlashInferAttentionBackend(device)
    raise ValueError(f"unknown attention backend {name!r} (auto, torch, triton, flashinfer)")

"""Attention-FFN disaggregation: transport, FFN workers and the layer-wise pipeline (see README.md)."""

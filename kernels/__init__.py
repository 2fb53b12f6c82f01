"""Triton kernels (fused MoE over the weights pool, paged decode attention) with torch references."""

"""Benchmarks of the multi-model server against real baselines: trace generator, streaming replay
client, baseline launcher, report/plots (`multi_model`), and a discrete-event GPU projection
(`simulate`). Nothing here is imported by the server."""

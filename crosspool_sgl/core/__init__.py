"""The engine core: requests, the step policy, the scheduler loop and the model runner.

Imports torch, the pools (mem/), models/ and layers/ only: never managers/, entrypoints/,
disagg/ or sglang, so it runs on a bare GPU machine (tests/test_layout.py checks it)."""

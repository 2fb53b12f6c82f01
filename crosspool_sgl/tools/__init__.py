"""Command-line helpers beside the engine (tiny test checkpoints, ...); none is imported at serve time."""

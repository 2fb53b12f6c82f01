"""Thin entry: `python benchmarks/multi_model.py [--quick]` runs `crosspool_sgl.bench.multi_model`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosspool_sgl.bench.multi_model import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

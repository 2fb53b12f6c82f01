"""Run the CPU shims lazily from a ``.pth`` file in the venv.

The set-up script writes ``crosspool_cpu_shims.pth`` into the venv's
site-packages with one ``import patches.sitecustomize_hook`` line, so
``.venv/bin/python -c 'import sglang, transformers'`` works with no extra
environment variables. The hook only installs an import finder: torch is not
imported until something imports torchvision (importing torch eagerly would add
~1 s to every interpreter in the venv, pip included).
"""

from __future__ import annotations

import importlib.abc
import sys


class _TorchvisionShimFinder(importlib.abc.MetaPathFinder):
    """Declares torchvision's op schemas right before torchvision is first imported."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            from patches.torchvision_ops import declare_torchvision_ops

            declare_torchvision_ops()
        return None  # let the normal finders load the real module


if not any(isinstance(f, _TorchvisionShimFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionShimFinder())

"""Backends: one module each, with the same small interface (see ``base.py``).

The registry below is the one place a backend's name is bound to its module; modules are
imported lazily so a missing compiler only matters when its backend is used.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from edgesmith.toolchain.errors import UserError

BACKENDS: dict[str, str] = {
    "tvm": "edgesmith.toolchain.backends.tvm",
    "openvino": "edgesmith.toolchain.backends.openvino",
    "tflite": "edgesmith.toolchain.backends.tflite",
}


def get_backend(name: str) -> ModuleType:
    """The backend module: ``NAME``, ``version()``, ``compile(request)``, ``executes_here(target)``, ``load(...)``."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])

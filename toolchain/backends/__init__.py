"""Backends: one module each, with the same small interface (see ``base.py``).

The registry below is the one place a backend is declared: its name and its module. Everything
else about a backend lives in its module (payload format, Python package, target settings) and,
for backends the device runtime runs, in its C++ plugin folder ``csrc/backends/<name>/`` (the
plugin reports the payload formats it runs). Modules are imported lazily (and import their
compilers lazily), so a missing compiler only matters when its backend is used.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from edgesmith.toolchain.errors import UserError

BACKENDS: dict[str, str] = {
    "tvm": "edgesmith.toolchain.backends.tvm",
    "openvino": "edgesmith.toolchain.backends.openvino",
    "tflite": "edgesmith.toolchain.backends.tflite",
    "ort": "edgesmith.toolchain.backends.ort",
}


def registered() -> list[str]:
    """The registered backend names, in registry order."""
    return list(BACKENDS)


def get_backend(name: str) -> ModuleType:
    """The backend module: ``NAME``, ``FORMAT``, ``PACKAGE``, ``DEVICE_RUNTIME``, ``Settings``,
    ``version()``, ``compile(request)``, ``executes_here(target)``, ``load(...)``."""
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; registered backends: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])

"""What every backend module receives and returns.

A backend module defines:

- ``NAME``: its registry key;
- ``FORMAT``: the payload format it writes (``payload.format`` in the manifest; the C++ plugin
  named ``NAME`` reports the formats it runs);
- ``PACKAGE``: the Python distribution whose version is recorded in the manifest;
- ``Settings``: a pydantic model of the backend's table in target files (``[NAME]``), reached as
  ``target.<NAME>``; a target listing the backend without the table gets the defaults;
- ``PRECISIONS``: the precisions it builds (``fp32`` always; ``int8`` through ``compile_int8``;
  ``bf16``/``fp16`` through ``compile`` with ``request.precision``), each a selection candidate
  when the target lists it (docs/selection.md);
- ``DEVICE_RUNTIME``: whether the C++ runtime runs its payload (then builds validate host artifacts
  through ``edgesmith.runtime.Session`` and prove them with ``edgesmith-run``);
- ``version() -> str``: the compiler's version, raising ``BackendUnavailable`` (with what to
  install) when it is missing;
- ``compile(request: CompileRequest) -> CompileResult``: write the payload into ``request.out_dir``;
- ``executes_here(target) -> Execution``: whether this machine can run the payload, and how;
- ``load(out_dir, result, target) -> Runner``: the engine's own Python API as a callable that runs
  one sample (inputs in manifest order) and returns the outputs in manifest order; used for payloads
  the C++ runtime does not run here, and as the baseline of bench/runtime_overhead.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel, ConfigDict

from edgesmith.toolchain.sources import ModelSource
from edgesmith.toolchain.targets import Precision, Target

Runner = Callable[[list[np.ndarray]], list[np.ndarray]]


class BackendSettings(BaseModel):
    """Base of a backend's ``Settings``: the ``[<backend>]`` table of a target file (keys checked)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class CompileRequest:
    source: ModelSource
    target: Target
    precision: Precision
    out_dir: Path  # the artifact's staging directory: payload files go here
    work_dir: Path  # scratch space, deleted after the build
    tuning_db: Path | None = None


@dataclass
class CompileResult:
    format: str  # payload format, see docs/artifact.md
    entry: str  # file name inside out_dir the runtime opens
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Execution:
    possible: bool
    how: str | None = None  # "native" | "host-engine"
    reason: str | None = None  # why not, when not possible

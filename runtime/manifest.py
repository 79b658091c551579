"""The artifact manifest, schema version 1 (docs/artifact.md), on the Python side.

This module is the single source of truth for the format in Python; the C++ reader in
``csrc/artifact/manifest.cc`` reads the same file and the test suite checks the two agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"

PayloadFormat = Literal["tvm-relax-so", "openvino-ir", "tflite"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(_Model):
    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        parts = Path(value).parts
        if not value or Path(value).is_absolute() or ".." in parts:
            raise ValueError(f"file path {value!r} must be relative and stay inside the artifact")
        return value


class TensorSpec(_Model):
    name: str
    dtype: str
    shape: list[int]

    @field_validator("shape")
    @classmethod
    def _static(cls, value: list[int]) -> list[int]:
        if any(d <= 0 for d in value):
            raise ValueError("shapes must be static and positive")
        return value


class SourceInfo(_Model):
    kind: Literal["onnx", "pytorch"]
    ref: str
    sha256: str


class ModelInfo(_Model):
    name: str
    version: str
    source: SourceInfo
    onnx_sha256: str
    opset: int


class BackendInfo(_Model):
    name: str
    version: str
    precision: Literal["fp32", "fp16"]
    options: dict[str, Any] = {}


class Payload(_Model):
    format: PayloadFormat
    entry: str


class GoldenSample(_Model):
    inputs: list[str]  # .npy paths, in the order of the manifest's inputs
    outputs: list[str]  # .npy paths, in the order of the manifest's outputs


class Golden(_Model):
    samples: list[GoldenSample] = Field(min_length=1)
    atol: float
    rtol: float


class OutputMonitor(_Model):
    """How the runtime summarises one output for drift monitoring."""

    name: str
    kind: Literal["classes", "histogram"]
    classes: int | None = None  # kind == "classes": arg-max over the last axis, one count per class
    edges: list[float] | None = None  # kind == "histogram": ascending bin edges (+ under/overflow bins)


class LatencyBuckets(_Model):
    """Log-spaced latency histogram: bucket k holds [start_us * factor**k, start_us * factor**(k+1))."""

    start_us: float = 1.0
    factor: float = 2 ** 0.25
    count: int = 96


class Monitoring(_Model):
    outputs: list[OutputMonitor]
    latency: LatencyBuckets = LatencyBuckets()


class Proof(_Model):
    """The artifact run on its own ISA by the device runtime (``edgesmith-run``), vs. golden outputs."""

    status: Literal["proven", "failed", "not-run"]
    isa: str
    how: Literal["native", "qemu-aarch64"] | None = None
    runner: str | None = None
    samples: int = 0
    max_abs_err: float | None = None
    reason: str | None = None


class Executed(_Model):
    isa: str
    how: Literal["native", "host-engine", "qemu-aarch64"]


class Validation(_Model):
    status: Literal["passed", "pending-proof"]
    reference: str
    executed: Executed | None
    samples: int
    max_abs_err: float | None
    max_rel_err: float | None
    top1_agreement: float | None
    atol: float
    rtol: float
    input_sensitivity: float
    reason: str | None = None


class HostInfo(_Model):
    isa: str
    cpu: str
    os: str


class BuildInfo(_Model):
    created_at: str
    duration_s: float
    host: HostInfo
    toolchain: dict[str, str]


class Manifest(_Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    model: ModelInfo
    target: dict[str, Any]
    backend: BackendInfo
    payload: Payload
    files: list[FileEntry]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    golden: Golden
    monitoring: Monitoring
    validation: Validation
    proof: Proof
    build: BuildInfo

    def to_bytes(self) -> bytes:
        """The canonical bytes written to manifest.json (and signed)."""
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        return cls.model_validate_json(data)

"""The artifact manifest, schema version 1 (docs/artifact.md), on the central side.

This pydantic model is the single source of truth for the format. ``docs/manifest.schema.json``
is generated from it (``python -m edgesmith.runtime.manifest --schema``), and the C++ reader in
``csrc/artifact/manifest.cc`` is tested to reject whatever that schema rejects in the fields it
reads (tests/test_manifest_schema.py). The schema forbids unknown keys; the C++ reader ignores
them, so an older device can read a newer manifest.

The toolchain imports this module; the device-side modules of ``edgesmith.runtime`` never do,
so a device needs no pydantic.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"

# Which formats exist is the backend registry's business and whether a device runs one is its
# plugin's; the manifest only fixes how a format name is spelled.
PAYLOAD_FORMAT_PATTERN = r"^[a-z0-9][a-z0-9.+-]*$"

NonEmptyStr = Annotated[str, Field(min_length=1)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
DType = Literal["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "float16", "float32", "float64"]


class _Model(BaseModel):
    # JSON has no NaN or infinity, so neither does a manifest: every number in it is finite (the C++
    # reader refuses the bare NaN/Infinity Python's json would otherwise write).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FileEntry(_Model):
    path: NonEmptyStr = Field(description="relative to the artifact directory, '/'-separated, no '..' "
                                          "(checked by integrity rule 7)")
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
    name: NonEmptyStr
    dtype: DType
    shape: list[Annotated[int, Field(ge=1, le=2**63 - 1)]] = Field(
        description="static: every dimension is a positive integer")


class SourceInfo(_Model):
    kind: Literal["onnx", "pytorch", "registry"]
    ref: str
    sha256: str
    # A model registry source (kind "registry"): the resolved version, so lineage runs from the
    # model version to this artifact. Absent for files and callables.
    model_uri: str | None = Field(default=None, description="models:/NAME/VERSION the build resolved (an alias resolves to its version)")
    run_id: str | None = Field(default=None, description="the MLflow run that trained and logged the model version")
    dataset_digest: str | None = Field(default=None, description="digest of the training data the version was tagged with")
    samples: str | None = Field(default=None, description="where the build's sample inputs (golden samples, monitoring "
                                "reference) came from: 'registry:<run>/data/test.npz', 'file:<path>' or 'synthetic N(0,1)'")


class ModelInfo(_Model):
    name: str
    version: str
    source: SourceInfo
    onnx_sha256: str
    opset: int


class TargetInfo(BaseModel):
    """The resolved target spec (``edgesmith targets --json``). The keys the device reads are
    typed; the rest of the spec (description, tolerance, backend tables, ...) is kept as is."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    name: NonEmptyStr
    isa: NonEmptyStr
    threads: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        default=None, description="engine worker threads; null or absent leaves it to the device")
    cpu_features: list[NonEmptyStr] = Field(
        default=[], description="CPU features the payload needs; the device refuses it if one is missing")


class BackendInfo(_Model):
    name: NonEmptyStr
    version: str
    precision: Literal["fp32", "bf16", "fp16", "int8"] = Field(
        description="the arithmetic the payload runs in; bf16/fp16/int8 artifacts carry the accuracy gate they passed "
                    "(`accuracy`)")
    options: dict[str, Any] = {}


class Payload(_Model):
    format: str = Field(pattern=PAYLOAD_FORMAT_PATTERN)
    entry: NonEmptyStr = Field(description="the file a runtime opens; listed in files")


class GoldenSample(_Model):
    inputs: list[NonEmptyStr]  # .npy paths, in the order of the manifest's inputs
    outputs: list[NonEmptyStr]  # .npy paths, in the order of the manifest's outputs


class Golden(_Model):
    samples: list[GoldenSample] = Field(min_length=1)
    atol: float = Field(ge=0, allow_inf_nan=False)
    rtol: float = Field(ge=0, allow_inf_nan=False)


# JSON Schema of the per-kind requirements that OutputMonitor's validator enforces.
_MONITOR_KIND_RULES = {"allOf": [
    {"if": {"properties": {"kind": {"const": "classes"}}, "required": ["kind"]},
     "then": {"required": ["classes"], "properties": {"classes": {"type": "integer"}}}},
    {"if": {"properties": {"kind": {"const": "histogram"}}, "required": ["kind"]},
     "then": {"required": ["edges"], "properties": {"edges": {"type": "array"}}}},
]}


class OutputMonitor(_Model):
    """How the runtime summarises one output for drift monitoring."""

    model_config = ConfigDict(json_schema_extra=_MONITOR_KIND_RULES)

    name: NonEmptyStr
    kind: Literal["classes", "histogram"]
    # kind == "classes": arg-max over the last axis, one count per class
    classes: Annotated[int, Field(ge=1, le=2**24)] | None = None
    # kind == "histogram": strictly ascending bin edges (+ under/overflow bins)
    edges: Annotated[list[FiniteFloat], Field(min_length=2, max_length=4097)] | None = None
    # The build's share of rows per class, or of values per bin then underflow, overflow: what a
    # monitor measures drift against (absent in artifacts built before it was recorded).
    reference: list[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]] | None = None

    @model_validator(mode="after")
    def _kind_fields(self) -> OutputMonitor:
        if self.kind == "classes" and self.classes is None:
            raise ValueError("a 'classes' monitor needs 'classes'")
        if self.kind == "histogram":
            if self.edges is None:
                raise ValueError("a 'histogram' monitor needs 'edges'")
            if any(b <= a for a, b in zip(self.edges, self.edges[1:])):
                raise ValueError("histogram edges must be strictly ascending")
        if self.reference is not None:
            want = self.classes if self.kind == "classes" else len(self.edges or []) - 1 + 2
            if len(self.reference) != want:
                raise ValueError(f"'reference' holds {len(self.reference)} shares, the {self.kind} monitor has {want} bins")
        return self


class LatencyBuckets(_Model):
    """Log-spaced latency histogram: bucket k holds [start_us * factor**k, start_us * factor**(k+1))."""

    start_us: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    factor: float = Field(default=2 ** 0.25, gt=1, allow_inf_nan=False)
    count: int = Field(default=96, ge=1, le=4096)


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


class QuantizationData(_Model):
    origin: str = Field(description="file:<path>, or registry:<run id>/data/test.npz[a:b] (a slice of the held-out split)")
    samples: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the inputs' bytes (C order, float32 as stored)")


class Quantization(_Model):
    """How an INT8 payload was made and the accuracy gate it passed (``edgesmith build --quantize int8``)."""

    scheme: Literal["int8"]
    method: NonEmptyStr = Field(description="the quantizer and its version, e.g. nncf 3.4.0 post-training quantization")
    calibration: QuantizationData
    evaluation: QuantizationData = Field(description="the labelled held-out inputs both accuracies were measured on")
    fp32_accuracy: float = Field(ge=0, le=1, description="top-1 accuracy of the FP32 model (ONNX Runtime)")
    int8_accuracy: float = Field(ge=0, le=1, description="top-1 accuracy of this payload")
    accuracy_drop: FiniteFloat = Field(description="(fp32_accuracy - int8_accuracy) in percentage points")
    max_accuracy_drop: FiniteFloat = Field(description="the bound the drop was checked against (--max-accuracy-drop)")
    top1_agreement: float = Field(ge=0, le=1, description="share of evaluation inputs where INT8 and FP32 predict the same class")


class GateData(_Model):
    """The inputs an accuracy gate ran on."""

    origin: str = Field(description="file:<path>, registry:<run id>/data/test.npz[a:b], or golden (the build's own "
                        "validation samples)")
    samples: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the inputs' bytes (C order, as stored)")
    labelled: bool


class AccuracyGate(_Model):
    """The accuracy budget a reduced-precision payload passed against the FP32 model (ONNX Runtime):
    ``edgesmith build --precision auto|bf16|fp16|int8`` (docs/selection.md)."""

    precision: Literal["bf16", "fp16", "int8"]
    proof: Literal["labelled", "unlabelled", "synthetic"] = Field(
        description="labelled: top-1 accuracy drop on labelled held-out data; unlabelled: top-1 agreement with FP32 "
                    "on >= 64 real inputs; synthetic: agreement on the build's own validation samples only (no "
                    "real data was given), a weaker proof")
    data: GateData
    executed: Literal["native", "host-engine", "qemu-aarch64"] = Field(description="where the payload ran for the gate")
    calibration: QuantizationData | None = Field(default=None, description="int8: the inputs the quantizer calibrated "
                                                 "on, never the ones the gate judged")
    reference_accuracy: float | None = Field(default=None, ge=0, le=1, description="FP32 top-1 accuracy (labelled only)")
    accuracy: float | None = Field(default=None, ge=0, le=1, description="this payload's top-1 accuracy (labelled only)")
    accuracy_drop: FiniteFloat | None = Field(default=None, description="reference_accuracy - accuracy, in points")
    max_accuracy_drop: FiniteFloat | None = Field(default=None, description="the bound (--max-accuracy-drop)")
    top1_agreement: float | None = Field(default=None, ge=0, le=1, description="share of inputs where this payload and "
                                         "FP32 predict the same class; null when the model is not a classifier")
    min_agreement: float | None = Field(default=None, ge=0, le=1, description="the bound (--min-agreement), when it applied")
    ties: int | None = Field(default=None, ge=0, description="synthetic proof: inputs where FP32's own top-2 margin is "
                             "within twice this payload's error there, left out of top1_agreement")
    max_rel_err: FiniteFloat | None = Field(default=None, ge=0, description="largest |error| relative to the output's "
                                            "spread over the gate's inputs, over the outputs that are not class scores "
                                            "(all outputs when there are no labels)")
    rel_err_bound: FiniteFloat | None = Field(default=None, ge=0, description="the bound: the target's tolerance.<precision>.rtol")


class HostInfo(_Model):
    isa: str
    cpu: str
    os: str


class BuildInfo(_Model):
    created_at: str
    duration_s: float
    host: HostInfo
    toolchain: dict[str, str]
    # Written by every build since backend selection (null when this machine could not time it);
    # absent in older artifacts, and kept absent when one is re-read, so their bytes stay the same.
    latency_us: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None, description="p50 latency of this artifact measured at build time through the edgesmith runtime "
        "(Session, the target's threads); null when the build host cannot run it (docs/selection.md)")

    serving_latency_us: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None, description="p50 latency of single requests arriving 25 ms apart, the engine idle in between, "
        "measured at build time like latency_us: what an agent serving sporadic requests measures, and so the "
        "baseline of the fleet monitor's latency alert; null when the build host cannot run it")

    @model_serializer(mode="wrap")
    def _keep_absent_latency_absent(self, handler):
        data = handler(self)
        for name in ("latency_us", "serving_latency_us"):
            if name not in self.model_fields_set:
                data.pop(name, None)
        return data


class SelectionCandidate(_Model):
    """One backend the build tried for the target, and how it fared (docs/selection.md)."""

    backend: NonEmptyStr
    # absent in artifacts built before precision was part of selection (they were fp32)
    precision: Literal["fp32", "bf16", "fp16", "int8"] | None = Field(
        default=None, exclude_if=lambda value: value is None, description="the candidate's precision (absent: fp32)")
    status: Literal["passed", "failed", "skipped"] = Field(
        description="passed: compiled, validated and proven as far as this machine can; failed: one of those steps "
                    "failed (see error); skipped: the backend is not installed here, or nothing here can run its "
                    "precision's accuracy gate")
    latency_us_p50: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        default=None, description="median latency of the best timing block, in microseconds; null when not timed here")
    latency_us_p95: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    timed_how: str | None = Field(default=None, description="e.g. 'native Session, 2 threads, best of 5 blocks of 200 runs'; "
                                  "null when not timed here")
    error: str | None = Field(default=None, description="why it failed or was skipped; null when it passed")
    gate: str | None = Field(default=None, exclude_if=lambda value: value is None,
                             description="the accuracy gate's figures for a reduced precision, in one line")


class Selection(_Model):
    """How the artifact's backend was chosen among the target's candidates (``--backend auto``/``all``)."""

    mode: Literal["auto", "all"] = Field(description="auto: only the chosen candidate was published; all: every "
                                         "passing candidate was, and `chosen` names the one auto would keep")
    rule: NonEmptyStr = Field(description="the ranking rule applied, in one sentence")
    chosen: NonEmptyStr = Field(description="the backend the rule picked")
    chosen_precision: Literal["fp32", "bf16", "fp16", "int8"] | None = Field(
        default=None, exclude_if=lambda value: value is None, description="the precision the rule picked (absent: fp32)")
    reason: NonEmptyStr = Field(description="why that backend, with the figures that decided it")
    candidates: list[SelectionCandidate] = Field(min_length=1, description="every candidate, in the target's listed order")


def _require_schema_version(schema: dict[str, Any]) -> None:
    # The field has a default so the toolchain need not pass it, but a manifest must state it.
    schema["required"] = ["schema_version", *schema.get("required", [])]


class Manifest(_Model):
    """manifest.json: what an artifact is, how it was built and checked (docs/artifact.md)."""

    model_config = ConfigDict(json_schema_extra=_require_schema_version)

    schema_version: Literal[1] = SCHEMA_VERSION
    name: NonEmptyStr
    model: ModelInfo
    target: TargetInfo
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
    # absent, not null, when not quantized: FP32 manifests keep their exact bytes
    quantization: Quantization | None = Field(default=None, exclude_if=lambda value: value is None,
                                              description="present only in quantized (INT8) artifacts")
    # absent, not null, in FP32 artifacts
    accuracy: AccuracyGate | None = Field(default=None, exclude_if=lambda value: value is None,
                                          description="present in bf16, fp16 and int8 artifacts: the accuracy gate passed")
    # absent, not null, in artifacts of a forced backend (--backend NAME) and in older ones
    selection: Selection | None = Field(default=None, exclude_if=lambda value: value is None,
                                        description="present when the build chose among the target's backends")

    def to_bytes(self) -> bytes:
        """The canonical bytes written to manifest.json (and signed)."""
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Read manifest.json as strictly as the schema and the device do: no type coercion, and
        schema_version must be stated. Raises ValueError (pydantic's ValidationError is one)."""
        raw = json.loads(data)
        if isinstance(raw, dict) and "schema_version" not in raw:
            raise ValueError("schema_version is missing")
        return cls.model_validate_json(data, strict=True)

    @field_validator("schema_version", mode="before")
    @classmethod
    def _integer_version(cls, value: Any) -> Any:
        # Literal[1] would take `true` (== 1 in Python); the schema and the C++ reader do not.
        if isinstance(value, bool):
            raise ValueError("schema_version must be the integer 1")
        return value


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of manifest.json, generated from :class:`Manifest`."""
    schema = Manifest.model_json_schema(mode="validation")
    return {**schema, "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": f"edgesmith artifact manifest (manifest.json), schema_version {SCHEMA_VERSION}"}


def json_schema_text() -> str:
    """:func:`json_schema` as written to docs/manifest.schema.json."""
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgesmith.runtime.manifest",
                                     description="Print the manifest's JSON Schema.")
    parser.add_argument("--schema", action="store_true", required=True,
                        help="print the JSON Schema (redirect it to docs/manifest.schema.json)")
    parser.parse_args(argv)
    sys.stdout.write(json_schema_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A capture record: the bytes a device uploads for one sample (contract.CaptureRecord, docs/capture.md).

    CAPTURE_MAGIC ("edgesmith-capture-record-v1\\n")
    the header's length: 8 lower-case hex digits and "\\n"
    the header: contract.CaptureRecord as UTF-8 JSON
    the data section: each tensor's raw little-endian C-order bytes, inputs then outputs, back to back

Everything is checked against the declared lengths before anything is allocated from them:
``parse`` takes the whole body (the receiver has already capped its size) and never trusts a length
the header or the length line claims beyond the bytes that are actually there.
"""

from __future__ import annotations

import hashlib

import numpy as np
from pydantic import ValidationError

from edgesmith.runtime import contract

LENGTH_DIGITS = 8
PREFIX = len(contract.CAPTURE_MAGIC) + LENGTH_DIGITS + 1
_DTYPES = {"float32": "<f4", "float16": "<f2", "int8": "i1", "uint8": "u1", "int32": "<i4", "int64": "<i8", "bool": "?"}


class RecordError(ValueError):
    """The body is not a capture record of the contract; the message says what is wrong."""


def encode(header: contract.CaptureRecord, tensors: list[np.ndarray]) -> bytes:
    """The record for ``header`` with these tensors (inputs then outputs, the header's order); what
    the device writes (tests and tools use this one)."""
    specs = header.inputs + header.outputs
    if len(specs) != len(tensors):
        raise ValueError(f"the header names {len(specs)} tensors, {len(tensors)} were given")
    data = []
    for spec, array in zip(specs, tensors):
        raw = np.ascontiguousarray(array, dtype=np.dtype(_DTYPES[spec.dtype])).tobytes()
        if len(raw) != spec.nbytes or list(array.shape) != spec.shape:
            raise ValueError(f"tensor {spec.name!r} does not match its header entry")
        data.append(raw)
    text = header.model_dump_json(exclude_none=True).encode()
    return contract.CAPTURE_MAGIC + f"{len(text):0{LENGTH_DIGITS}x}\n".encode() + text + b"".join(data)


def header_for(fleet: str, device: str, capture_id: str, manifest_sha256: str, model: str, ts_ms: int, reason: str,
               inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], **extra) -> contract.CaptureRecord:
    """A header laying out ``inputs`` then ``outputs`` back to back."""
    at, specs = 0, {"inputs": [], "outputs": []}
    for part, arrays in (("inputs", inputs), ("outputs", outputs)):
        for name, array in arrays.items():
            specs[part].append({"name": name, "dtype": str(array.dtype), "shape": list(array.shape), "offset": at,
                                "nbytes": int(array.nbytes)})
            at += int(array.nbytes)
    return contract.CaptureRecord.model_validate({
        "fleet": fleet, "device": device, "capture_id": capture_id, "manifest_sha256": manifest_sha256, "model": model,
        "ts_ms": ts_ms, "reason": reason, **specs, **extra})


def parse(body: bytes) -> contract.CaptureRecord:
    """The record's header, once the whole body is checked to be exactly what it declares."""
    if not body.startswith(contract.CAPTURE_MAGIC):
        raise RecordError("the body does not start with the capture record's magic line")
    length_text = body[len(contract.CAPTURE_MAGIC):PREFIX]
    if len(length_text) != LENGTH_DIGITS + 1 or length_text[-1:] != b"\n" \
            or not all(c in b"0123456789abcdef" for c in length_text[:-1]):
        raise RecordError(f"the header length is not {LENGTH_DIGITS} lower-case hex digits and a newline")
    length = int(length_text[:-1], 16)
    if length > contract.MAX_CAPTURE_HEADER:
        raise RecordError(f"the header of {length} bytes exceeds {contract.MAX_CAPTURE_HEADER}")
    if PREFIX + length > len(body):
        raise RecordError(f"the header claims {length} bytes; the body ends before that")
    try:
        header = contract.CaptureRecord.model_validate_json(body[PREFIX:PREFIX + length])
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "header"
        raise RecordError(f"the header is not a capture record ({where}: {first['msg']})") from None
    data = len(body) - PREFIX - length
    if data != header.data_bytes:
        raise RecordError(f"the data section holds {data} bytes; the header's tensors take {header.data_bytes}")
    return header


def tensors(body: bytes, header: contract.CaptureRecord, part: str = "inputs") -> dict[str, np.ndarray]:
    """The record's input (or output) arrays, read-only views into ``body``."""
    start = len(body) - header.data_bytes
    return {t.name: np.frombuffer(body, dtype=np.dtype(_DTYPES[t.dtype]), count=t.nbytes // contract.DTYPE_BYTES[t.dtype],
                                  offset=start + t.offset).reshape(t.shape)
            for t in getattr(header, part)}


def sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()

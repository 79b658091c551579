"""The C++ .npy reader/writer (csrc/runtime/npy.cc) against NumPy, and fuzzed with hypothesis.

Golden samples are .npy files inside signed artifacts, but the reader still treats its input as
untrusted: malformed bytes must end in a typed error, never a crash.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesmith.runtime import _core, errors

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64"]
SHAPES = [(), (0,), (1,), (5,), (2, 3), (3, 0, 2), (1, 1, 1, 1), (2, 3, 4, 5)]
_FUZZ = settings(max_examples=400, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])


def _numpy_bytes(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    if version is None:
        np.save(buffer, array)
    else:
        np.lib.format.write_array(buffer, array, version=version)
    return buffer.getvalue()


def _sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(len(shape) * 31 + DTYPES.index(dtype))
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(size=shape) * 100).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_against_numpy(dtype: str, shape: tuple[int, ...]) -> None:
    array = _sample(dtype, shape)
    # numpy -> C++ reader
    read = _core.npy_read(_numpy_bytes(array))
    assert read.dtype == array.dtype and read.shape == array.shape
    np.testing.assert_array_equal(read, array)
    # C++ writer -> numpy, byte-identical to np.save
    written = _core.npy_write(array)
    assert written == _numpy_bytes(array)
    np.testing.assert_array_equal(np.load(io.BytesIO(written)), array)


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_reads_every_format_version(version: tuple[int, int]) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(_core.npy_read(_numpy_bytes(array, version)), array)


def test_writer_copies_non_contiguous_arrays() -> None:
    base = np.arange(24, dtype=np.int32).reshape(4, 6)
    for view in (base[:, ::2], base.T, np.asfortranarray(base)):
        np.testing.assert_array_equal(np.load(io.BytesIO(_core.npy_write(view))), view)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.asfortranarray(np.ones((2, 3), np.float32)), "Fortran order"),
        (np.ones(3, dtype=">f4"), "dtype"),
        (np.ones(3, dtype=np.complex64), "dtype"),
        (np.array(["a"]), "dtype"),
    ],
)
def test_unsupported_files_are_refused(array: np.ndarray, expected: str) -> None:
    with pytest.raises(errors.ValueError, match=expected):
        _core.npy_read(_numpy_bytes(array))


def test_truncated_and_trailing_data() -> None:
    data = _numpy_bytes(np.ones((4, 4), np.float64))
    for cut in (1, 8, len(data) - 128 + 1):
        with pytest.raises(errors.ValueError, match="truncated|header"):
            _core.npy_read(data[:-cut])
    with pytest.raises(errors.ValueError, match="after the data"):
        _core.npy_read(data + b"\0")


def test_shape_overflow_is_refused() -> None:
    header = b"{'descr': '<f8', 'fortran_order': False, 'shape': (4611686018427387904, 8), }\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header
    with pytest.raises(errors.ValueError, match="overflows"):
        _core.npy_read(data)


def _only_typed_errors(data: bytes) -> None:
    try:
        _core.npy_read(data)
    except errors.ValueError:
        pass


@_FUZZ
@given(data=st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    _only_typed_errors(data)
    _only_typed_errors(b"\x93NUMPY\x01\x00" + data)


_VALID = _numpy_bytes(np.arange(6, dtype=np.float32).reshape(2, 3))
_HEADER_END = _VALID.index(b"\n") + 1


@_FUZZ
@given(data=st.data())
def test_fuzz_mutated_headers(data: st.DataObject) -> None:
    raw = bytearray(_VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, _HEADER_END - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if action == "flip":
            raw[position] = data.draw(st.integers(0, 255))
        elif action == "delete":
            del raw[position:position + data.draw(st.integers(1, 6))]
        else:
            raw[position:position] = data.draw(st.binary(min_size=1, max_size=12))
    _only_typed_errors(bytes(raw))


@_FUZZ
@given(shape=st.lists(st.integers(0, 2 ** 64), max_size=5),
       descr=st.sampled_from(["<f4", "|b1", "<i8", ">i8", "<c8", "O", "<f2", "|u1"]),
       fortran=st.booleans(), extra=st.binary(max_size=64))
def test_fuzz_header_fields(shape: list[int], descr: str, fortran: bool, extra: bytes) -> None:
    header = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {tuple(shape)}, }}\n".encode()
    _only_typed_errors(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + extra)

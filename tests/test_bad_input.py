"""Bad input: one clear sentence, non-zero exit, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import DIGITS, run_cli

pytestmark = pytest.mark.integration


def _fails(tmp_path: Path, *args: str, env: dict | None = None) -> str:
    out = tmp_path / "dist"
    result = run_cli("build", *args, "-o", str(out), check=False, env=env)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert "error:" in result.stderr
    assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())
    return " ".join(result.stderr.split())


def test_text_file_is_not_a_model(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n")
    assert "is not a valid ONNX model" in _fails(tmp_path, str(bad), "-t", "x86_64-avx2")


def test_truncated_onnx_file(tmp_path):
    from test_build import _conv_model

    good = _conv_model(tmp_path, "m", "Relu")
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    assert "is not a valid ONNX model" in _fails(tmp_path, str(good), "-t", "x86_64-avx2")


def test_missing_model_file(tmp_path):
    assert "does not exist" in _fails(tmp_path, str(tmp_path / "nope.onnx"))


def test_unknown_target_suggests(tmp_path):
    message = _fails(tmp_path, DIGITS, "--input-shape", "1,1,8,8", "-t", "rpi4")
    assert "unknown target 'rpi4'" in message and "rpi4-aarch64" in message


def test_backend_not_listed_by_target(tmp_path):
    message = _fails(tmp_path, DIGITS, "--input-shape", "1,1,8,8", "-t", "android-arm64-tflite", "--backend", "ort")
    assert "target android-arm64-tflite does not list backend 'ort'; its backends are: tflite" in message


def test_pytorch_source_without_input_shape(tmp_path):
    assert "needs --input-shape" in _fails(tmp_path, DIGITS, "-t", "x86_64-avx2")


def test_bad_input_shape_syntax(tmp_path):
    assert "is not a shape" in _fails(tmp_path, DIGITS, "--input-shape", "1,x,8", "-t", "x86_64-avx2")


def test_missing_callable(tmp_path):
    assert "has no attribute 'nope'" in _fails(tmp_path, "edgesmith.toolchain.models.digits:nope", "--input-shape", "1,1,8,8")


def test_missing_cross_compiler_names_package(tmp_path):
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "odd-board.toml").write_text(
        'extends = "_linux-aarch64"\ndescription = "board whose compiler is missing"\nthreads = 2\n'
        '[tvm]\ncross_compiler = "aarch64-nowhere-g++"\ncross_compiler_package = "g++-aarch64-linux-gnu"\n'
        '[tvm.target]\nmcpu = "cortex-a53"\n')
    message = _fails(tmp_path, DIGITS, "--input-shape", "1,1,8,8", "-t", "odd-board", "--backend", "tvm",
                     env={"EDGESMITH_TARGETS_PATH": str(targets)})
    assert "aarch64-nowhere-g++" in message and "apt-get install g++-aarch64-linux-gnu" in message


def test_invalid_target_file_in_user_dir(tmp_path):
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "bad-board.toml").write_text('extends = "_linux-aarch64"\ndescription = "x"\nthreads = "four"\n')
    message = _fails(tmp_path, DIGITS, "--input-shape", "1,1,8,8", "-t", "bad-board", env={"EDGESMITH_TARGETS_PATH": str(targets)})
    assert "bad-board.toml" in message and "'threads'" in message

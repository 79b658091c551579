"""`edgesmith tune` (MetaSchedule into the cached database) and `edgesmith build` applying it.

One small tuning run (the digits CNN on 1x1x8x8, a dozen trials; conftest's digits_tuned, which
tests/test_emulation.py shares) is used by the module's tests through its EDGESMITH_HOME; the RPC
test tunes again through a loopback tracker and server.
"""

from __future__ import annotations

import json
import os
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DIGITS, run_cli

def _host() -> str:
    from edgesmith.toolchain.targets import host_target

    return host_target().name


def _manifest(build: dict) -> dict:
    (artifact,) = build["artifacts"]
    return json.loads((Path(artifact["path"]) / "manifest.json").read_text())


def _build(home: Path, out: Path, *extra: str, shape: str = "1,1,8,8") -> tuple[dict, str]:
    result = run_cli("build", DIGITS, "--input-shape", shape, "-t", "host", "-b", "tvm", "-o", str(out), "--json", *extra,
                     env={"EDGESMITH_HOME": str(home)})
    return json.loads(result.stdout), result.stderr


@pytest.fixture(scope="module")
def tuned(digits_tuned) -> dict:
    """The run's shared tuning (conftest's digits_tuned: 12 trials into a home of its own)."""
    return digits_tuned


@pytest.mark.slow
def test_tune_writes_a_database_under_the_home(tuned):
    summary, home = tuned["summary"], tuned["home"]
    db = Path(summary["database"])
    assert db.is_relative_to(home / "tuning")
    records = (db / "database_tuning_record.json").read_text().splitlines()
    assert len(records) >= 1 and summary["trials"] >= 1 and summary["tasks"] >= 3
    meta = json.loads((db / "tuning.json").read_text())
    assert meta["measured_on"] == _host() and meta["trials"] == summary["trials"]
    assert summary["latency_us"] is None or summary["latency_us"] > 0


@pytest.mark.slow
def test_build_applies_the_cached_database_without_tuning_and_validates(tuned, tmp_path):
    db = Path(tuned["summary"]["database"])
    before = {f.name: f.stat().st_mtime_ns for f in db.iterdir() if f.is_file()}
    build, stderr = _build(tuned["home"], tmp_path / "dist")
    manifest = _manifest(build)
    tuning = manifest["backend"]["options"]["tuning"]
    assert tuning["database"] == str(db)
    assert 0 < tuning["workloads_matched"] <= tuning["workloads_total"]
    assert tuning["measured_on"] == _host()
    assert len(tuning["sha256"]) == 64
    assert manifest["validation"]["status"] == "passed", manifest["validation"]
    assert "matched none" not in stderr
    # a warm cache: the build measured nothing and appended nothing to the database
    assert {f.name: f.stat().st_mtime_ns for f in db.iterdir() if f.is_file()} == before


@pytest.mark.slow
def test_corrupt_database_warns_and_builds_untuned(tuned, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "database_workload.json").write_text('["not a workload"\n{{{\n')
    (corrupt / "database_tuning_record.json").write_text("garbage\n")
    build, stderr = _build(tuned["home"], tmp_path / "dist", "--tuning-db", str(corrupt))
    manifest = _manifest(build)
    assert "warning: tuning database" in stderr and "corrupt" in stderr
    assert manifest["backend"]["options"]["tuning"] is None
    assert manifest["validation"]["status"] == "passed"


@pytest.mark.slow
def test_database_without_matching_records_warns_matched_none(tuned, tmp_path):
    empty = tmp_path / "no-records"
    empty.mkdir()
    db = Path(tuned["summary"]["database"])
    (empty / "database_workload.json").write_bytes((db / "database_workload.json").read_bytes())
    (empty / "database_tuning_record.json").write_text("")
    build, stderr = _build(tuned["home"], tmp_path / "dist", "--tuning-db", str(empty))
    assert "matched none" in stderr
    manifest = _manifest(build)
    tuning = manifest["backend"]["options"]["tuning"]
    assert tuning["workloads_matched"] == 0 and tuning["workloads_total"] > 0
    assert manifest["validation"]["status"] == "passed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_key(port: int, key: str, timeout: float = 120.0) -> None:
    from tvm import rpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"].get(key, {}).get("free", 0):
                return
        except Exception:
            pass
        time.sleep(1)
    raise AssertionError(f"the RPC server did not register key {key} within {timeout} s")


@pytest.mark.slow
def test_tune_through_an_rpc_tracker_and_server(tmp_path):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                               "--port-end", str(port + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        time.sleep(2)
        procs.append(subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}",
                                       "--key", "loopback", "--host", "127.0.0.1"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        _wait_for_key(port, "loopback")
        result = run_cli("tune", DIGITS, "--input-shape", "1,1,8,8", "-t", "host", "--trials", "8", "--json",
                         "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", "loopback",
                         env={"EDGESMITH_HOME": str(tmp_path / "home")})
        summary = json.loads(result.stdout)
        assert summary["measured_on"] == "rpc:loopback"
        assert summary["trials"] >= 1 and summary["failed_trials"] < summary["trials"]
        assert (Path(summary["database"]) / "database_tuning_record.json").read_text().strip()
    finally:
        # Each in its own process group, killed whole: the server's session workers
        # (tvm.exec.popen_worker) would otherwise outlive it, orphaned.
        for p in reversed(procs):
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def test_unreachable_tracker_is_one_clear_error(tmp_path):
    port = _free_port()  # nothing listens there
    result = run_cli("tune", DIGITS, "--input-shape", "1,1,8,8", "-t", "host", "--trials", "4", "--rpc-tracker",
                     f"127.0.0.1:{port}", "--rpc-key", "nobody", "--rpc-timeout", "5", check=False,
                     env={"EDGESMITH_HOME": str(tmp_path)})
    assert result.returncode == 1
    assert f"RPC tracker at 127.0.0.1:{port} cannot be reached" in result.stderr
    assert "Traceback" not in result.stderr


def test_rpc_key_without_tracker_is_refused(tmp_path):
    result = run_cli("tune", DIGITS, "--input-shape", "1,1,8,8", "--rpc-key", "rpi4", check=False,
                     env={"EDGESMITH_HOME": str(tmp_path)})
    assert result.returncode == 1 and "--rpc-tracker and --rpc-key go together" in result.stderr


def test_operator_tvm_cannot_compile_is_named(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Celu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "celu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = run_cli("tune", str(path), "-t", "host", "--trials", "4", check=False, env={"EDGESMITH_HOME": str(tmp_path)})
    assert result.returncode == 1
    assert "Celu" in result.stderr and "another backend" in result.stderr

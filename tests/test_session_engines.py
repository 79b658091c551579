"""The device runtime on real engines: Session and edgesmith-run on TVM and OpenVINO artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

EDGESMITH_RUN = str(Path(sys.executable).parent / "edgesmith-run")


@pytest.fixture(scope="module", params=["tvm", "openvino"])
def host_artifact(request, digits_artifacts):
    art = digits_artifacts["artifacts"][("x86_64-avx2", request.param)]
    return Path(art["path"]), digits_artifacts


def _session(path: Path, arts, threads: int = 2):
    from edgesmith.runtime import Session
    from edgesmith.runtime.keys import load_public_key

    return Session(path, threads=threads, trusted_keys=[load_public_key(arts["pub"])])


def _golden(path: Path):
    manifest = json.loads((path / "manifest.json").read_text())
    for sample in manifest["golden"]["samples"]:
        yield ([np.load(path / p) for p in sample["inputs"]], [np.load(path / p) for p in sample["outputs"]], manifest)


def test_session_matches_onnx_runtime_golden_outputs(host_artifact):
    path, arts = host_artifact
    session = _session(path, arts)
    assert [i.name for i in session.inputs] == ["input"] and session.outputs[0].shape == [1, 10]
    for inputs, expected, manifest in _golden(path):
        got = session.run(inputs)
        np.testing.assert_allclose(got[0], expected[0], atol=manifest["golden"]["atol"], rtol=manifest["golden"]["rtol"])
        by_name = session.run({"input": inputs[0]})
        np.testing.assert_array_equal(by_name[manifest["outputs"][0]["name"]], got[0])
    assert session.self_test()["passed"]
    stats = session.stats()
    assert stats["runs"] >= 4 and stats["errors"] == 0


def test_edgesmith_run_gives_the_same_numbers(host_artifact, tmp_path):
    path, arts = host_artifact
    inputs, _, _ = next(_golden(path))
    np.save(tmp_path / "x.npy", inputs[0])
    env = {"EDGESMITH_HOME": str(arts["home"]), "PATH": "/usr/bin:/bin"}
    from edgesmith.runtime import _core

    env["EDGESMITH_BACKEND_PATH"] = str(Path(_core.__file__).parent / "backends")
    result = subprocess.run([EDGESMITH_RUN, str(path), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"),
                             "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), _session(path, arts).run(inputs)[0])
    bench = subprocess.run([EDGESMITH_RUN, str(path), "--input", str(tmp_path / "x.npy"), "--bench", "20", "--json"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert bench.returncode == 0, bench.stderr
    report = json.loads(bench.stdout)["bench"]
    assert report["runs"] == 20, report
    p50, p95, p99 = report["p50_ms"] / 1e3, report["p95_ms"] / 1e3, report["p99_ms"] / 1e3
    assert 0 < p50 <= p95 <= p99, report
    # Throughput is runs over the wall time of the timed loop. That time holds every run, so at
    # least the slower half (10 × p50). It is at most the 20 runs (each <= p99 / 0.81, p99 being
    # interpolated between the two slowest) plus the loop's own nanoseconds between runs; the
    # factor 0.1 leaves room for the process being descheduled in those gaps.
    assert 0.1 / p99 <= report["throughput_per_s"] <= 2.0 / p50, report
    # The process holds the C++ runtime, the engine's libraries and the model: about 10 MB (TVM) to
    # 100 MB (OpenVINO) here. A unit slip (ru_maxrss is KiB) would be off by 1024 either way.
    payload_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    assert max(4.0, payload_mb) < report["peak_rss_mb"] < 2048, report


def test_eight_threads_match_serial_runs(host_artifact):
    path, arts = host_artifact
    session = _session(path, arts)
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1, 1, 8, 8)).astype(np.float32) for _ in range(16)]
    serial = [session.run([x])[0] for x in xs]
    mismatches, errors = [], []

    def worker(t: int) -> None:
        try:
            for k in range(200):
                i = (t * 200 + k) % len(xs)
                y = session.run([xs[i]])[0]
                if not np.array_equal(y, serial[i]):
                    mismatches.append((t, k))
        except Exception as e:  # surfaced below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and mismatches == []
    assert session.stats()["runs"] >= 16 + 8 * 200


def test_stats_count_runs_errors_classes_and_nans(host_artifact):
    from edgesmith.runtime.errors import InputError

    path, arts = host_artifact
    session = _session(path, arts)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1, 1, 8, 8)).astype(np.float32) for _ in range(5)]
    x_nan = xs[0].copy()
    x_nan[0, 0, 0, 0] = np.nan
    outputs = [session.run([x])[0] for x in [*xs, x_nan]]
    with pytest.raises(InputError, match="shape"):
        session.run([np.zeros((1, 1, 8, 9), np.float32)])

    stats = session.stats()
    assert (stats["runs"], stats["errors"]) == (6, 1), stats
    assert (stats["nan_input_runs"], stats["nan_input_values"]) == (1, 1), stats

    # Each run is counted under its output's arg-max (NaN logits skipped), a row of NaNs as `nan`.
    counted = stats["outputs"][session.outputs[0].name]
    expected, all_nan = [0] * 10, 0
    for y in outputs:
        if np.isnan(y).all():
            all_nan += 1
        else:
            expected[int(np.nanargmax(y[0]))] += 1
    assert counted["kind"] == "classes"
    assert (counted["counts"], counted["nan"], counted["overflow"]) == (expected, all_nan, 0), (counted, outputs)
    assert sum(counted["counts"]) + counted["nan"] == stats["runs"]

    latency = stats["latency"]
    assert sum(latency["buckets"]) + latency["underflow"] + latency["overflow"] == stats["runs"]
    assert 0 < latency["p50_us"] <= latency["p95_us"] <= latency["p99_us"] <= latency["max_us"], latency
    assert latency["mean_us"] * stats["runs"] == pytest.approx(latency["sum_us"])
    assert latency["mean_us"] <= latency["max_us"]


def test_proof_recorded_for_host_artifacts(digits_artifacts):
    for backend in ("tvm", "openvino"):
        art = digits_artifacts["artifacts"][("x86_64-avx2", backend)]
        proof = json.loads((Path(art["path"]) / "manifest.json").read_text())["proof"]
        assert proof["status"] == "proven" and proof["how"] == "native", proof


def test_prove_cli_on_host_artifact(digits_artifacts):
    from conftest import run_cli

    path = digits_artifacts["artifacts"][("x86_64-avx2", "tvm")]["path"]
    env = {"EDGESMITH_HOME": str(digits_artifacts["home"])}
    out = run_cli("prove", path, env=env).stdout
    assert out.startswith("proven:") and "native" in out
    record = json.loads(run_cli("prove", path, "--json", env=env).stdout)
    assert record["status"] == "proven" and record["samples"] == 8


def test_prove_cli_refuses_tampered_artifact(digits_artifacts, tmp_path):
    import shutil

    from conftest import run_cli

    src = Path(digits_artifacts["artifacts"][("x86_64-avx2", "openvino")]["path"])
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    data = bytearray((dst / "model.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dst / "model.bin").write_bytes(bytes(data))
    result = run_cli("prove", str(dst), env={"EDGESMITH_HOME": str(digits_artifacts["home"])}, check=False)
    assert result.returncode == 1 and "model.bin" in result.stderr and "Traceback" not in result.stderr

"""edgesmith bench on the digits CNN: the report's files and figures, and its bad-input errors.

Timings are never asserted (the machine is shared); what is checked is that every engine was run
and measured, that the figures hang together, and that the outputs match ONNX Runtime's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from edgesmith.toolchain.bench import BenchConfig, run_bench
from edgesmith.toolchain.errors import UserError

from conftest import DIGITS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def digits():
    from edgesmith.toolchain.sources import load_source

    return load_source(DIGITS, [1, 1, 8, 8])


def test_report_files_figures_and_ratios(digits, tmp_path):
    import numpy as np

    inputs = tmp_path / "inputs.npz"  # --samples: three inputs, of which --num-samples 2 are used
    np.savez(inputs, input=np.random.default_rng(5).standard_normal((3, 1, 1, 8, 8)).astype(np.float32))
    config = BenchConfig(model=DIGITS, against="ort,openvino", rounds=2, iterations=8, warmup=1, samples=2,
                         samples_path=inputs, command="edgesmith bench (test)")
    report = run_bench(config, tmp_path / "report", source=digits)
    assert report["samples"] == 2 and report["samples_origin"] == f"file:{inputs}"

    files = {p.name for p in (tmp_path / "report").iterdir()}
    assert files == {"report.json", "report.md", "latency.png", "ratio.png"}
    assert json.loads((tmp_path / "report" / "report.json").read_text()) == json.loads(json.dumps(report))
    for png in ("latency.png", "ratio.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    names = [e["name"] for e in report["engines"]]
    assert names == ["edgesmith:openvino", "edgesmith:ort", "ort", "openvino"]
    markdown = (tmp_path / "report" / "report.md").read_text()
    for e in report["engines"]:
        assert f"| {e['name']} |" in markdown
        assert len(e["rounds_p50_ms"]) == 2 and len(e["latencies_ms"]) == 8
        assert e["p50_ms"] == pytest.approx(min(e["rounds_p50_ms"]))  # the best round is reported
        assert 0 < e["p50_ms"] <= e["p95_ms"] <= e["p99_ms"]
        assert e["throughput_per_s"] > 0 and math.isfinite(e["throughput_per_s"])
        assert 0 < e["load_s"] < e["cold_start_s"] < 120
        assert 10 < e["peak_rss_mib"] < 4096  # the child's own peak, not this process's
        assert e["size_bytes"] > 50_000  # the digits CNN's weights are ~100 KB
        assert e["max_abs_err_vs_ort"] < 1e-4
    peers = [e for e in report["engines"] if e["role"] == "peer"]
    fastest = min(peers, key=lambda e: e["p50_ms"])
    assert report["fastest_peer"] == fastest["name"] and fastest["ratio_to_fastest_peer"] == 1.0
    for e in report["engines"]:
        assert e["ratio_to_fastest_peer"] == pytest.approx(e["p50_ms"] / fastest["p50_ms"])
    goals = report["goals"]
    by = {e["name"]: e for e in report["engines"]}
    assert goals["session_overhead_ort"]["ratio"] == pytest.approx(by["edgesmith:ort"]["p50_ms"] / by["ort"]["p50_ms"])
    assert goals["session_overhead_openvino"]["ratio"] == pytest.approx(
        by["edgesmith:openvino"]["p50_ms"] / by["openvino"]["p50_ms"])
    best = min(by["edgesmith:ort"]["p50_ms"], by["edgesmith:openvino"]["p50_ms"])
    assert goals["selected_vs_fastest"]["ratio"] == pytest.approx(best / min(by["ort"]["p50_ms"], by["openvino"]["p50_ms"]))
    assert "Session overhead" in markdown and report["machine"]["cores"] >= 1


def test_unknown_engine_lists_the_valid_ones():
    with pytest.raises(UserError, match=r"unknown engine 'tensorrt'.*valid engines are: ort, openvino, litert"):
        run_bench(BenchConfig(model=DIGITS, against="ort,tensorrt"))


def test_litert_needs_a_pytorch_source(digits, tmp_path):
    onnx_path = tmp_path / "digits.onnx"
    onnx_path.write_bytes(digits.onnx_bytes)
    with pytest.raises(UserError, match="litert converts from PyTorch"):
        run_bench(BenchConfig(model=str(onnx_path), against="litert", artifacts=[]))


def test_target_this_machine_cannot_run_is_refused():
    with pytest.raises(UserError, match="rpi4-aarch64 .*does not run natively"):
        run_bench(BenchConfig(model=DIGITS, target="rpi4-aarch64"))


def test_artifact_for_another_isa_is_refused(digits, tmp_path):
    from edgesmith.toolchain.build import BuildOptions, build_one, run_reference
    from edgesmith.toolchain.signing import ephemeral_key
    from edgesmith.toolchain.targets import get_target

    options = BuildOptions(out_dir=tmp_path / "dist", num_samples=2, golden_samples=2)
    built = build_one(digits, run_reference(digits, options), get_target("rpi4-aarch64"), "ort", options, ephemeral_key())
    with pytest.raises(UserError, match=r"built for rpi4-aarch64 \(aarch64, linux\).*benchmark it on a aarch64 device"):
        run_bench(BenchConfig(model=DIGITS, artifacts=[built.path], against="ort"), source=digits)


def test_not_an_artifact_and_bad_counts(digits, tmp_path):
    with pytest.raises(UserError, match="is not an edgesmith artifact"):
        run_bench(BenchConfig(model=DIGITS, artifacts=[tmp_path], against="ort"), source=digits)
    with pytest.raises(UserError, match="--iterations 1 is too small"):
        run_bench(BenchConfig(model=DIGITS, iterations=1))

"""bench/shadow_overhead.py runs as a user runs it: a short run on the digits CNN (OpenVINO serving,
ONNX Runtime shadowing) prints the table and its JSON hangs together, and Ctrl-C mid-shadow leaves
no process behind. Timings are never asserted (the machine is shared)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BENCH = Path(__file__).resolve().parent.parent / "bench" / "shadow_overhead.py"


def _args(digits_artifacts: dict, *extra: str) -> list[str]:
    arts = digits_artifacts["artifacts"]
    return [sys.executable, str(BENCH), "--artifacts", arts[("x86_64-avx2", "openvino")]["path"],
            arts[("x86_64-avx2", "ort")]["path"], "--build-key", str(digits_artifacts["pub"]), "--rps", "20",
            "--warmup-s", "0.5", "--settle-s", "0.5", "--interval", "1", *extra]


def _left_behind(work: str) -> list[str]:
    """Processes whose command line names the bench's working directory (agent, shadow child, monitor,
    artifact server, mosquitto)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and work in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_short_run_prints_the_table_and_tears_down(digits_artifacts, tmp_path):
    out = subprocess.run(_args(digits_artifacts, "--rounds", "1", "--phase-s", "2", "--sample", "0.5",
                               "--markdown", str(tmp_path / "shadow.md"), "--json", str(tmp_path / "shadow.json")),
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    work = re.search(r"working in (\S+)", out.stderr).group(1)
    assert not Path(work).exists() and not _left_behind(work)

    result = json.loads((tmp_path / "shadow.json").read_text())
    assert [r["phase"] for r in result["phases"]] == ["off 1", "on 1", "off 2"]
    assert [r["phase"] for r in result["pooled"]] == ["pooled off", "pooled on"]
    for row in result["phases"]:
        assert row["requests"] == 40 and row["errors"] == 0, row  # 2 s at 20 rps, every one answered
        assert row["agent_runs"] >= row["requests"]  # the agent saw at least the measured requests
        assert 0 < row["client_p50_ms"] <= row["client_p99_ms"] and 0 < row["agent_p50_ms"] <= row["agent_p99_ms"]
    on = result["phases"][1]
    assert on["shadow"] and on["shadow_id"].startswith("sh-")
    # offered: run, dropped, or still queued when the shadow stopped
    assert on["shadow_samples"] > 0 and on["shadow_offered"] >= on["shadow_samples"] + on["shadow_dropped"]
    assert on["shadow_agreement"] > 0.9  # the same network on another engine (a near-tie may flip a row)
    assert result["pooled"][0]["requests"] == 80 and result["pooled"][1]["shadow_samples"] == on["shadow_samples"]
    ratios = result["ratios"]
    assert ratios["client_p50"] == pytest.approx(result["pooled"][1]["client_p50_ms"] / result["pooled"][0]["client_p50_ms"])
    assert ratios["agent_p50"] == pytest.approx(result["pooled"][1]["agent_p50_ms"] / result["pooled"][0]["agent_p50_ms"])
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]

    markdown = (tmp_path / "shadow.md").read_text()
    assert markdown.strip() == out.stdout.strip()
    for phase in ("off 1", "on 1", "off 2", "pooled off", "pooled on"):
        assert f"| {phase} |" in markdown
    assert "On / off (pooled): client p50" in markdown and "Goal: p50 within 5%" in markdown
    assert ("not evidence" in markdown) == result["loaded"]


def test_ctrl_c_mid_shadow_stops_everything(digits_artifacts):
    proc = subprocess.Popen(_args(digits_artifacts, "--rounds", "1", "--phase-s", "5"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if re.search(r"shadow sh-\S+ runs", line):
                break
        else:
            pytest.fail("the bench never ran the shadow:\n" + "".join(lines))
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, rest
    assert "interrupted; everything the bench started was stopped" in rest and "Traceback" not in rest
    work = re.search(r"working in (\S+)", "".join(lines)).group(1)
    assert not Path(work).exists() and not _left_behind(work)

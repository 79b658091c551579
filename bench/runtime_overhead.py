"""Overhead of edgesmith's C++ Session over each engine's own Python API, on the same compiled model.

Builds SqueezeNet 1.1 (plain PyTorch, seeded weights: edgesmith.toolchain.models.squeezenet) for
the host target with each backend, then times
`Session.run` and the engine's Python API (OpenVINO's InferRequest, TVM's Relax VM) in one process,
alternating blocks of runs (engines' thread pools spin after a call, so call-by-call interleaving
would tax whichever runs second). Prints per-backend medians and the ratio Session / Python API.

    .venv/bin/python bench/runtime_overhead.py [--backend openvino] [--rounds 7] [--block 30]

Goal: ratio <= 1.03. Only same-run ratios on an otherwise idle machine mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgesmith.runtime import Session
from edgesmith.runtime.keys import load_public_key
from edgesmith.toolchain.backends import get_backend
from edgesmith.toolchain.backends.base import CompileResult
from edgesmith.toolchain.targets import get_target

SQUEEZENET = "edgesmith.toolchain.models.squeezenet:squeezenet"


def build(backend: str, out: Path, home: Path) -> Path:
    cmd = [str(Path(sys.executable).parent / "edgesmith"), "build", SQUEEZENET, "--input-shape", "1,3,224,224", "-t", "host",
           "--backend", backend, "-o", str(out), "--num-samples", "2", "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "EDGESMITH_HOME": str(home)})
    if result.returncode != 0:
        raise SystemExit(f"build failed: {result.stderr}")
    return Path(json.loads(result.stdout)["artifacts"][0]["path"])


def time_block(run, x, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return times


def measure(artifact: Path, home: Path, rounds: int, block: int) -> dict:
    manifest = json.loads((artifact / "manifest.json").read_text())
    target = get_target(manifest["target"]["name"])
    backend = get_backend(manifest["backend"]["name"])
    result = CompileResult(format=manifest["payload"]["format"], entry=manifest["payload"]["entry"],
                           options=manifest["backend"]["options"])
    python_api = backend.load(artifact, result, target)
    session = Session(artifact, threads=target.threads, trusted_keys=[load_public_key(home / "keys" / "default.pub")])
    x = [np.random.default_rng(0).standard_normal(s["shape"]).astype(s["dtype"]) for s in manifest["inputs"]]
    np.testing.assert_allclose(session.run(x)[0], python_api(x)[0], rtol=1e-4, atol=1e-5)
    for run in (python_api, session.run):  # warm up both
        time_block(run, x, max(3, block // 5))
    per_block = {"python": [], "session": []}
    for r in range(rounds):
        order = (("python", python_api), ("session", session.run)) if r % 2 == 0 else (("session", session.run), ("python", python_api))
        for name, run in order:
            per_block[name].append(statistics.median(time_block(run, x, block)))
    py, se = statistics.median(per_block["python"]), statistics.median(per_block["session"])
    return {"backend": manifest["backend"]["name"], "target": target.name, "python_api_ms": py * 1e3,
            "session_ms": se * 1e3, "ratio": se / py, "rounds": rounds, "block": block}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", action="append", choices=["openvino", "tvm", "ort"], help="default: all three")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--block", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        rows = []
        for backend in args.backend or ["openvino", "tvm", "ort"]:
            artifact = build(backend, Path(tmp) / "dist", home)
            block = max(3, args.block // 10) if backend == "tvm" else args.block  # untuned TVM is ~60x slower
            rows.append(measure(artifact, home, args.rounds, block))
    print(f"{'backend':10} {'python API ms':>14} {'Session ms':>11} {'ratio':>7}")
    for row in rows:
        print(f"{row['backend']:10} {row['python_api_ms']:14.2f} {row['session_ms']:11.2f} {row['ratio']:7.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

"""Time one engine in a fresh process and read back its figures (``_child.py`` does the runs).

Cold start is process start → first result, read as the parent's clock before spawning and the
child's clock at its first output. Peak RSS is the child's own high-water mark (VmHWM), which the
child reads at its end: neither ``RUSAGE_CHILDREN`` (the maximum over every child this process ever
had) nor the child's ``ru_maxrss`` from ``wait4`` (Linux carries it across ``execve``, so every child
would report at least this process's peak) measures the engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgesmith.toolchain.bench.engines import Engine
from edgesmith.toolchain.errors import UserError


@dataclass
class Block:
    """One child process's run of one engine."""

    engine: str
    version: str
    latencies_ms: list[float]
    timed_wall_s: float
    cold_start_s: float
    load_s: float
    peak_rss_mib: float
    outputs: list[list[np.ndarray]]

    @property
    def p50_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 50))


def save_samples(samples: list[list[np.ndarray]], path: Path) -> None:
    np.savez(path, **{f"s{k}_i{i}": x for k, sample in enumerate(samples) for i, x in enumerate(sample)})


def run_block(engine: Engine, samples_path: Path, num_inputs: int, threads: int, warmup: int, iterations: int,
              work: Path, tag: str, timeout_s: float = 900.0) -> Block:
    spec_path, result_path, outputs_path = (work / f"{tag}.{suffix}" for suffix in ("spec.json", "result.json", "out.npz"))
    spec = {"kind": engine.kind, "path": str(engine.path), "threads": threads, "inputs": str(samples_path),
            "num_inputs": num_inputs, "outputs": str(outputs_path), "result": str(result_path),
            "warmup": warmup, "iterations": iterations, **engine.extra}
    spec_path.write_text(json.dumps(spec))
    stderr_path = work / f"{tag}.stderr"
    with open(stderr_path, "wb") as stderr:
        spawned_at = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "edgesmith.toolchain.bench._child", str(spec_path)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise UserError(f"{engine.name} took longer than {timeout_s:.0f} s to benchmark; lower --iterations") from None
    if proc.returncode != 0 or not result_path.is_file():
        lines = [line for line in stderr_path.read_text(errors="replace").splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise UserError(f"{engine.name} failed while being benchmarked: {why}")
    result = json.loads(result_path.read_text())
    data = np.load(outputs_path)
    count = len({key.split("_")[0] for key in data.files})
    per_sample = len(data.files) // count
    outputs = [[data[f"s{k}_o{j}"] for j in range(per_sample)] for k in range(count)]
    return Block(engine=engine.name, version=result["version"], latencies_ms=[t * 1e3 for t in result["latencies_s"]],
                 timed_wall_s=result["timed_wall_s"], cold_start_s=result["first_result_at"] - spawned_at,
                 load_s=result["load_s"], peak_rss_mib=result["peak_rss_kib"] / 1024.0, outputs=outputs)

"""TVM MetaSchedule tuning: throughput (stock LocalBuilder vs edgesmith's persistent builder) and
latency (tuned TVM vs untuned TVM vs ONNX Runtime, same thread count).

    .venv/bin/python bench/tvm_tuning.py [--model edgesmith.toolchain.models.edgenet:edgenet]
        [--input-shape 1,3,96,96] [--trials 256] [--stock-trials 0] [--prepack-trials 0]
        [--threads 2] [--max-minutes 40] [--json out.json]

Each latency is measured in its own process (engines' thread pools spin after a call), as the
median of blocks of runs. Tuning goes into a scratch EDGESMITH_HOME, never the user's cache.
``--stock-trials N`` also tunes N trials with MetaSchedule's stock LocalBuilder (timeout raised
to 300 s, else every trial fails here) and default search, for the trials/min comparison;
``--prepack-trials N`` tunes again with CPU weight prepacking and times that build too.
Only same-run figures on an otherwise idle machine compare; the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EDGENET = "edgesmith.toolchain.models.edgenet:edgenet"

_TIMER = r"""
import json, os, sys, time
import numpy as np
kind, model, shape, threads, db, prepack = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6] == "1"
from edgesmith.toolchain.sources import load_source
source = load_source(model, [int(d) for d in shape.split(",")])
x = np.random.default_rng(0).standard_normal(source.inputs[0].shape).astype(np.float32)
if kind == "ort":
    import onnxruntime as ort
    opts = ort.SessionOptions(); opts.intra_op_num_threads = threads; opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(source.onnx_bytes, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    run = lambda: sess.run(None, {name: x})
else:
    import tvm
    from tvm import relax
    from pathlib import Path
    from edgesmith.toolchain import tune
    from edgesmith.toolchain.backends.tvm import _tvm_target
    from edgesmith.toolchain.targets import get_target
    target = _tvm_target(get_target("host"))
    mod = tune.load_relax(source)
    exe = tune.compile_tuned(mod, target, Path(db) if db != "-" else None, prepack)
    vm = relax.VirtualMachine(exe, tvm.cpu())
    arg = tvm.runtime.tensor(x)
    run = lambda: vm["main"](arg)
run(); run()
once = time.perf_counter(); run(); once = time.perf_counter() - once
block = max(1, min(200, int(0.5 / max(once, 1e-6))))
medians = []
for _ in range(7):
    t = time.perf_counter()
    for _ in range(block):
        run()
    medians.append((time.perf_counter() - t) / block)
print(json.dumps({"median_ms": sorted(medians)[len(medians) // 2] * 1e3, "min_ms": min(medians) * 1e3}))
"""


def time_engine(kind: str, model: str, shape: str, threads: int, db: Path | None, prepack: bool, home: Path) -> dict:
    env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "EDGESMITH_HOME": str(home)}
    out = subprocess.run([sys.executable, "-c", _TIMER, kind, model, shape, str(threads), str(db) if db else "-",
                          "1" if prepack else "0"], capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def tune_run(model: str, shape: str, trials: int, home: Path, *, stock: bool = False, prepack: bool = False,
             max_minutes: float | None = None) -> dict:
    """Tune in this process (TVM's own threads), into ``home``; returns throughput and the database."""
    os.environ["EDGESMITH_HOME"] = str(home)
    from edgesmith.toolchain import tune
    from edgesmith.toolchain.sources import load_source
    from edgesmith.toolchain.targets import get_target

    source = load_source(model, [int(d) for d in shape.split(",")])
    target = get_target("host")
    if not stock:
        request = tune.TuneRequest(source=source, target=target, trials=trials, max_minutes=max_minutes, prepack=prepack)
        started = time.monotonic()
        result = tune.run_tune(request, on_update=_report, on_status=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
        return {"database": str(result.database), "trials": result.trials, "failed": result.failed, "tasks": result.tasks,
                "minutes": round(result.minutes, 2), "trials_per_min": round(result.trials_per_min, 1),
                "wall_minutes_incl_setup": round((time.monotonic() - started) / 60, 2), "latency_us_at_tune": result.latency_us}
    from edgesmith.toolchain.backends.tvm import _tvm_target

    tvm_target = _tvm_target(target)
    mod = tune.load_relax(source)
    db = Path(tempfile.mkdtemp(prefix="stock-", dir=home))
    started = time.monotonic()
    builder = tune.stock_builder()
    stop = tune._Stop(time.monotonic() + max_minutes * 60 if max_minutes else None)
    progress = tune.tune_module(mod, tvm_target, db, trials, builder=builder, runner=tune.local_runner(), stop=stop,
                                on_update=_report, fast_search=False)
    minutes = (time.monotonic() - started) / 60
    return {"database": str(db), "trials": progress.done, "failed": progress.failed, "minutes": round(minutes, 2),
            "trials_per_min": round(progress.done / minutes, 1)}


def _report(p) -> None:
    est = f"{p.estimate_us / 1000:.2f} ms" if p.estimate_us else "-"
    print(f"  {p.done}/{p.total} trials, {p.failed} failed, kernels {est}, {p.trials_per_min:.0f} trials/min",
          file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EDGENET)
    parser.add_argument("--input-shape", default="1,3,96,96")
    parser.add_argument("--trials", type=int, default=256)
    parser.add_argument("--stock-trials", type=int, default=0)
    parser.add_argument("--prepack-trials", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    home = Path(tempfile.mkdtemp(prefix="edgesmith-tvm-tuning-"))
    report = {"model": args.model, "input_shape": args.input_shape, "threads": args.threads, "load_before": os.getloadavg()}
    print(f"model {args.model} {args.input_shape}; scratch home {home}; load {os.getloadavg()}", file=sys.stderr)

    print("untuned TVM / ONNX Runtime latency", file=sys.stderr, flush=True)
    report["untuned_tvm"] = time_engine("tvm", args.model, args.input_shape, args.threads, None, False, home)
    report["ort"] = time_engine("ort", args.model, args.input_shape, args.threads, None, False, home)
    print(f"  untuned {report['untuned_tvm']}, ORT {report['ort']}", file=sys.stderr, flush=True)

    print(f"tuning {args.trials} trials (persistent builder, fast search)", file=sys.stderr, flush=True)
    report["tuned"] = tune_run(args.model, args.input_shape, args.trials, home, max_minutes=args.max_minutes)
    report["tuned"]["latency"] = time_engine("tvm", args.model, args.input_shape, args.threads,
                                             Path(report["tuned"]["database"]), False, home)
    print(f"  {report['tuned']}", file=sys.stderr, flush=True)

    if args.prepack_trials:
        print(f"tuning {args.prepack_trials} trials with CPU weight prepacking", file=sys.stderr, flush=True)
        report["prepack"] = tune_run(args.model, args.input_shape, args.prepack_trials, home, prepack=True,
                                     max_minutes=args.max_minutes)
        report["prepack"]["latency"] = time_engine("tvm", args.model, args.input_shape, args.threads,
                                                   Path(report["prepack"]["database"]), True, home)
        print(f"  {report['prepack']}", file=sys.stderr, flush=True)
    if args.stock_trials:
        print(f"tuning {args.stock_trials} trials with the stock LocalBuilder and default search", file=sys.stderr, flush=True)
        report["stock"] = tune_run(args.model, args.input_shape, args.stock_trials, home, stock=True, max_minutes=args.max_minutes)
        print(f"  {report['stock']}", file=sys.stderr, flush=True)
    report["load_after"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Regenerate BENCHMARKS.md: edgesmith's artifacts against ONNX Runtime, OpenVINO and LiteRT.

Models (plain PyTorch, seeded weights; toolchain/models/): ResNet-18, MobileNetV2 and a
ViT-Ti/16-sized ViT at 1×3×224×224, and the digits CNN at 1×1×8×8. For each, ``edgesmith bench``'s
machinery (toolchain/bench/) builds the host target's openvino and ort artifacts, times them
through the device runtime's ``Session`` and the peers through their own Python APIs on the same
ONNX graph (LiteRT: converted from the same PyTorch module), each engine in its own process,
several rounds with the order rotated, best round by median. Then the same with INT8 artifacts
(``--quantize int8``: NNCF for openvino, ONNX Runtime QDQ for ort), calibrated on synthetic
inputs: good for latency, meaningless for accuracy, so the accuracy gate is opened
(``max_accuracy_drop=100``) and the INT8 rows say so.

    .venv/bin/python bench/benchmarks.py                  # everything (~20-30 min on 2 cores)
    .venv/bin/python bench/benchmarks.py --models digits_cnn --rounds 2
    .venv/bin/python bench/benchmarks.py --render         # BENCHMARKS.md again from bench/report/benchmarks.json
    .venv/bin/python bench/benchmarks.py --update --models resnet18 --no-int8 --rounds 5   # re-run one part

Writes bench/report/benchmarks.json (every figure), docs/img/bench/*.png and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgesmith.toolchain.bench import BenchConfig, Progress, run_bench
from edgesmith.toolchain.bench.report import HEADER, markdown_table, ms, plot, table_rows
from edgesmith.toolchain.errors import UserError

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "report" / "benchmarks.json"
IMAGES = REPO / "docs" / "img" / "bench"
OUT = REPO / "BENCHMARKS.md"
PRECISION_REPORT = REPO / "bench" / "report" / "precision.md"
SHADOW_REPORT = REPO / "bench" / "report" / "shadow_overhead.md"

# name → (module:callable, input shape, timed runs per round, warm-up runs)
MODELS = {
    "resnet18": ("edgesmith.toolchain.models.resnet:resnet18", [1, 3, 224, 224], 40, 10),
    "mobilenet_v2": ("edgesmith.toolchain.models.mobilenet:mobilenet_v2", [1, 3, 224, 224], 100, 20),
    "vit_small": ("edgesmith.toolchain.models.vit:vit_small", [1, 3, 224, 224], 40, 10),
    "digits_cnn": ("edgesmith.toolchain.models.digits:digits_cnn", [1, 1, 8, 8], 1000, 100),
}
TITLES = {"resnet18": "ResNet-18", "mobilenet_v2": "MobileNetV2", "vit_small": "ViT-Ti/16 (small ViT)", "digits_cnn": "digits CNN"}


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def synthetic_int8_data(source, work: Path, count: int = 64) -> tuple[Path, Path]:  # the gate takes >= 64
    """Calibration and 'evaluation' inputs for --quantize int8 without a dataset: synthetic images
    (toolchain/models/edgenet.py) for image models, N(0,1) otherwise; the evaluation labels are the
    FP32 model's own top-1, so the gate's figures are INT8/FP32 agreement, not accuracy."""
    from edgesmith.toolchain.reference import ReferenceModel

    spec = source.inputs[0]
    if spec.shape[1] == 3 and spec.shape[2] == spec.shape[3] and spec.shape[2] >= 32:
        from edgesmith.toolchain.models.edgenet import synthetic_images

        calib = synthetic_images(count, seed=11, size=spec.shape[2]).numpy()
        evaluation = synthetic_images(count, seed=12, size=spec.shape[2]).numpy()
    else:
        rng = np.random.default_rng(11)
        calib, evaluation = (rng.standard_normal((count, *spec.shape[1:])).astype(np.float32) for _ in range(2))
    model = ReferenceModel(source.onnx_model)
    labels = np.array([int(np.argmax(model.run([x[None]])[0])) for x in evaluation])
    np.savez(work / "calib.npz", x=calib.astype(np.float32))
    np.savez(work / "eval.npz", x=evaluation.astype(np.float32), y=labels)
    return work / "calib.npz", work / "eval.npz"


def synthetic_samples(source, work: Path, count: int = 4) -> Path | None:
    """Inputs for timing and the error column: synthetic images for image models (what their
    BatchNorm statistics and the INT8 calibration saw); None (seeded N(0,1)) for the rest."""
    spec = source.inputs[0]
    if not (len(spec.shape) == 4 and spec.shape[1] == 3 and spec.shape[2] >= 32):
        return None
    from edgesmith.toolchain.models.edgenet import synthetic_images

    images = synthetic_images(count, seed=13, size=spec.shape[2]).numpy().astype(np.float32)
    np.savez(work / "samples.npz", **{spec.name: images[:, None]})
    return work / "samples.npz"


def bench_model(name: str, rounds: int, against: str, with_int8: bool) -> list[dict]:
    from edgesmith.toolchain.sources import load_source

    ref, shape, iterations, warmup = MODELS[name]
    log(f"{name}: loading {ref}")
    source = load_source(ref, shape)
    progress = Progress(status=lambda text: log(f"{name}: {text}"))
    results = []
    scratch = tempfile.TemporaryDirectory()
    samples = synthetic_samples(source, Path(scratch.name))
    common = dict(model=ref, input_shapes=shape, rounds=rounds, iterations=iterations, warmup=warmup, samples_path=samples)
    command = f"edgesmith bench {ref} --input-shape {','.join(map(str, shape))} -t host --rounds {rounds} --iterations {iterations} --warmup {warmup}"
    try:
        results.append(timed(run_bench, BenchConfig(against=against, command=f"{command} --against {against}", **common),
                                 progress=progress, source=source))
    except UserError as e:
        if "litert" not in against.split(","):
            raise
        log(f"{name}: {e}; again without litert")
        peers = ",".join(p for p in against.split(",") if p != "litert")
        results.append(timed(run_bench, BenchConfig(against=peers, command=f"{command} --against {peers}", **common),
                                 progress=progress, source=source))
        results[-1]["note"] = f"LiteRT left out: {e}"
    if with_int8:
        with tempfile.TemporaryDirectory() as tmp:
            calib, evaluation = synthetic_int8_data(source, Path(tmp))
            peers = ",".join(p for p in against.split(",") if p != "litert")
            config = BenchConfig(against=peers, quantize="int8", calib=calib, eval_data=evaluation, max_accuracy_drop=100.0,
                                 command=f"{command} --against {peers} --quantize int8 --calib calib.npz --eval eval.npz "
                                         "--max-accuracy-drop 100", **common)
            try:
                results.append(timed(run_bench, config, progress=progress, source=source))
            except UserError as e:
                log(f"{name}: INT8 failed: {e}")
                results.append({"model": {"name": source.name}, "quantize": "int8", "error": str(e)})
    scratch.cleanup()
    for result in results:
        result["key"] = name
    return results


def timed(run, *args, **kwargs) -> dict:
    """``run(...)``'s report with the machine's 1-minute load average before and after it."""
    before = os.getloadavg()[0]
    result = run(*args, **kwargs)
    result["load_avg"] = [before, os.getloadavg()[0]]
    return result


def inputs_text(result: dict) -> str:
    origin = result.get("samples_origin", "seeded N(0,1)")
    if origin.startswith("file:"):
        return "synthetic images (toolchain/models/edgenet.py), like those BatchNorm statistics and INT8 calibration saw"
    return "seeded N(0,1) noise" + (", outside what the INT8 calibration saw" if result.get("quantize") and
                                    result["model"]["inputs"][0]["shape"][1] == 3 else "")


def render(data: dict) -> str:
    IMAGES.mkdir(parents=True, exist_ok=True)
    machine = data["machine"]
    lines = ["# Benchmarks", "",
             "edgesmith's artifacts, run through the device runtime's `Session` (C++), against the engines they wrap and "
             "LiteRT, each called through its own Python API on the same model. Generated by `bench/benchmarks.py` "
             "(the `edgesmith bench` machinery, toolchain/bench/); do not edit by hand.", "",
             f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['os']}, Python {machine['python']}.",
             f"- Date: {data['started']} to {data['finished']} (UTC). Load average (1 min) at start {data['load_start']:.2f}, "
             f"at end {data['load_end']:.2f}: **the machine is shared with other jobs**, so absolute figures move "
             "2-3× between runs; ratios measured in the same rounds are steadier, and only the best round counts.",
             f"- Command: `{data['command']}`",
             "- Method: batch 1, the host target's 2 threads for every engine, FP32 unless marked. Every engine runs "
             "in its own process (engines' thread pools spin after a call); several rounds (each section says how many), each "
             "running every engine once in rotated order; per engine the round with the lowest median is reported, and "
             "the summary also gives the ratio of the medians over all rounds as a check on luck. Peers: ONNX Runtime "
             "`InferenceSession` (all graph optimizations) and OpenVINO `Core.compile_model` (LATENCY hint, f32) on the "
             "ONNX graph edgesmith exported; LiteRT `Interpreter` (XNNPACK) on the `.tflite` litert-torch converted "
             "from the same PyTorch module. Models: plain-PyTorch, seeded weights with BatchNorm statistics from "
             "synthetic images (toolchain/models/), so outputs depend on inputs; accuracy means nothing here.",
             "- INT8 rows: edgesmith's `--quantize int8` artifacts (openvino: NNCF; ort: ONNX Runtime QDQ) **calibrated "
             "on 32 synthetic inputs** (synthetic images for the 224×224 models, N(0,1) for the digits CNN) with the "
             "accuracy gate opened: the figures are latency only. Peers in the INT8 runs stay FP32 (the engines' own "
             "INT8 tooling run directly is compared in `bench/int8.py`).", "",
             "## Summary", "",
             "Ratio = p50 latency / the fastest of ONNX Runtime and OpenVINO called directly, in the same rounds. "
             "Session overhead = edgesmith's artifact through `Session` / the same engine called directly (FP32).", ""]
    summary_rows, behind, behind_all = [], [], []
    for result in data["results"]:
        title = TITLES.get(result["key"], result["key"])
        precision = (result.get("quantize") or "fp32").upper()
        if "error" in result:
            summary_rows.append([title, precision, f"failed: {result['error']}", "", "", "", "", "", ""])
            continue
        goals, by = result["goals"], {e["name"]: e for e in result["engines"]}
        sel = goals.get("selected_vs_fastest")
        ov, ort_ = goals.get("session_overhead_openvino"), goals.get("session_overhead_ort")
        litert = by.get("litert")
        typical = (float(np.median(by[sel["engine"]]["rounds_p50_ms"])) / float(np.median(by[sel["fastest"]]["rounds_p50_ms"])))
        summary_rows.append([title, precision, f"{sel['engine']} {ms(by[sel['engine']]['p50_ms'])}",
                             f"{sel['fastest']} {ms(by[sel['fastest']]['p50_ms'])}", f"**{sel['ratio']:.2f}×**", f"{typical:.2f}×",
                             f"{ov['overhead_pct']:+.1f}%" if ov else "–", f"{ort_['overhead_pct']:+.1f}%" if ort_ else "–",
                             f"{ms(litert['p50_ms'])}" if litert else "–"])
        if sel["ratio"] > 1.0:
            behind.append(f"{title} {precision}: {sel['engine']} is {100 * (sel['ratio'] - 1):.1f}% behind {sel['fastest']}"
                          + (" (the round medians put it ahead: not conclusive)" if typical <= 1.0 else
                             f" ({100 * (typical - 1):.0f}% by round medians)"))
        elif typical > 1.0:
            behind.append(f"{title} {precision}: ahead in the best rounds but {100 * (typical - 1):.1f}% behind "
                          f"{sel['fastest']} by round medians (not conclusive)")
        peers = [e for e in result["engines"] if e["role"] == "peer"]
        fastest_all = min(peers, key=lambda e: e["p50_ms"])
        if fastest_all["name"] not in ("ort", "openvino") and by[sel["engine"]]["p50_ms"] > fastest_all["p50_ms"]:
            behind_all.append(f"{title} {precision}: {fastest_all['name']} {ms(fastest_all['p50_ms'])} ms, {sel['engine']} "
                              f"{by[sel['engine']]['p50_ms'] / fastest_all['p50_ms']:.2f}× that")
    lines += [markdown_table(["model", "precision", "best edgesmith artifact, p50 ms", "fastest of ORT/OpenVINO, p50 ms",
                              "ratio (goal ≤ 1.00×)", "ratio of round medians", "Session overhead openvino (goal ≤ 3%)", "Session overhead ort (goal ≤ 3%)",
                              "LiteRT p50 ms"], summary_rows), ""]
    lines += ["Where edgesmith's best artifact is behind the fastest of ORT/OpenVINO: " +
              ("; ".join(behind) + "." if behind else "nowhere in this run."), "",
              "Where a peer edgesmith does not ship for x86 (LiteRT, XNNPACK) beats edgesmith's best artifact: " +
              ("; ".join(behind_all) + "." if behind_all else "nowhere in this run."), "",
              "How far to trust this: the machine is two cores shared with several other jobs (load averages per "
              "section below). The same engine's round medians differ by up to 2-5× between rounds, so differences "
              "under ~30% between engines are within noise; a ratio below 1 from a lucky round is not a win. "
              "Session overhead figures here are dominated by that noise; `bench/runtime_overhead.py` measures it "
              "in one process with alternating blocks, which is steadier.", ""]
    for result in data["results"]:
        if "error" in result:
            continue
        title = TITLES.get(result["key"], result["key"])
        precision = (result.get("quantize") or "fp32")
        stem = f"{result['key']}-{precision}-"
        latency, ratio = plot(result, IMAGES, prefix=stem)
        shape = "×".join(map(str, result["model"]["inputs"][0]["shape"]))
        lines += [f"## {title}, {precision.upper()} ({shape})", "",
                  f"{result['rounds']} rounds × {result['iterations']} timed runs after {result['warmup']} warm-up runs, "
                  f"cycling over {result['samples']} inputs: {inputs_text(result)}. Run at {result['date']}"
                  + (f", load average {result['load_avg'][0]:.1f} → {result['load_avg'][1]:.1f} on {machine['cores']} cores. "
                     if "load_avg" in result else ". ")
                  +
                  f"`{result['command']}`" + (f" ({result['note']})" if result.get("note") else ""), "",
                  markdown_table(HEADER, table_rows(result)), "",
                  f"Medians of every round, ms: " + "; ".join(
                      f"{e['name']} {', '.join(ms(v) for v in e['rounds_p50_ms'])}" for e in result["engines"]), "",
                  f"![{title} {precision} latency](docs/img/bench/{latency.name}) ![{title} {precision} ratio](docs/img/bench/{ratio.name})", ""]
    lines += ["Columns: p50/p95/p99 of the best round; runs/s = timed runs / their wall time (batch 1, one caller); "
              "cold start = process start → first result (interpreter start, imports, model load or compile, first run); "
              "peak RSS = the engine process's high-water mark; size = what the engine loads (edgesmith: the artifact "
              "payload, golden samples excluded; peers: the .onnx or .tflite file); error = max abs difference from "
              "ONNX Runtime's outputs on the section's inputs (INT8: the quantization's own difference).", ""]
    if PRECISION_REPORT.is_file():  # bench/precision.py's tables: backend x precision within the accuracy budget
        lines += ["## Precision: the fastest artifact within the accuracy budget (`bench/precision.py`)", "",
                  "`edgesmith build` with its defaults (`--precision auto`: every backend x precision the host target "
                  "lists, reduced precisions gated against FP32, the fastest kept) against OpenVINO at its own defaults "
                  "(`core.compile_model(model, \"CPU\")`, which picks bf16 by itself on this CPU, unchecked), OpenVINO "
                  "pinned to f32 and ONNX Runtime FP32, on the same ONNX graph, and LiteRT's interpreter (XNNPACK) on "
                  "the FP32 flatbuffer litert-torch converts from the same module, each engine in its own process, best of "
                  "3 processes x 5 blocks, order rotated. The candidate tables are the build's own timing (Session, "
                  "rotating blocks). Regenerate: `.venv/bin/python bench/precision.py --markdown "
                  "bench/report/precision.md`, then `bench/benchmarks.py --render`.", "",
                  PRECISION_REPORT.read_text().strip(), ""]
    if SHADOW_REPORT.is_file():  # bench/shadow_overhead.py: what a running shadow costs the serving path
        lines += ["## Shadow evaluation: serving latency with the shadow off and on (`bench/shadow_overhead.py`)", "",
                  "One x86 edgesmith-agent serving an FP32 artifact over its HTTP API, a client sending `POST /v1/infer` "
                  "at a fixed rate (open loop) and timing each round trip; the agent's own serving latency from its "
                  "`/v1/stats` histogram. Phases alternate on the same agent (off, on, off, ...): \"on\" is `edgesmith "
                  "shadow start` of the same model built with another backend, `--sample 0.2`, measured once the agent "
                  "runs it. Goal (issue 18): p50 with the shadow on within 5% of p50 with it off. Regenerate: "
                  "`.venv/bin/python bench/shadow_overhead.py --markdown bench/report/shadow_overhead.md`, then "
                  "`bench/benchmarks.py --render`.", "",
                  SHADOW_REPORT.read_text().strip(), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", default="ort,openvino,litert")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--render", action="store_true", help="only write BENCHMARKS.md from the saved results")
    parser.add_argument("--update", action="store_true",
                        help="re-run only --models and replace their results in the saved ones (the others are kept)")
    args = parser.parse_args()
    if args.render:
        data = json.loads(RESULTS.read_text())
    else:
        from edgesmith.toolchain.bench import _machine

        command = " ".join([".venv/bin/python", "bench/benchmarks.py", *map(shlex.quote, sys.argv[1:])])
        fresh = {"started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "load_start": os.getloadavg()[0],
                 "command": command, "rounds": args.rounds, "machine": _machine(), "results": []}
        data = json.loads(RESULTS.read_text()) if args.update and RESULTS.is_file() else fresh
        if args.update:
            data["command"] = f"{data['command']}; then {command}"
        models = args.models.split(",")
        precisions = {None} if args.no_int8 else {None, "int8"}
        data["results"] = [r for r in data["results"] if not (r["key"] in models and r.get("quantize") in precisions)]
        for name in models:
            data["results"] += bench_model(name, args.rounds, args.against, not args.no_int8)
            order = list(MODELS)
            data["results"].sort(key=lambda r: (order.index(r["key"]), r.get("quantize") or ""))
            data["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            data["load_end"] = os.getloadavg()[0]
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(data, indent=1))  # after each model: a crash keeps what was measured
    OUT.write_text(render(data))
    log(f"wrote {OUT.relative_to(REPO)}, {RESULTS.relative_to(REPO)} and docs/img/bench/")


if __name__ == "__main__":
    main()

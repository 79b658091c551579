"""The fastest artifact within the accuracy budget, against OpenVINO at its own defaults.

OpenVINO's CPU plugin picks its inference precision from the CPU: ``core.compile_model(model,
"CPU")``, the way its documentation shows it, runs bf16 on a CPU with AVX512_BF16 or AMX, with no
accuracy check. ``edgesmith build`` with its defaults (``--precision auto``) builds every backend x
precision the host target lists, gates each reduced precision on the data given, and keeps the
fastest. This script measures both, in one run, each engine in its own process (engines' thread
pools spin after a call and tax whatever runs next), best block mean of several processes, the
order rotated:

- **labelled**: a plain-PyTorch ResNet-18 trained on real data (scikit-learn's digits upscaled to
  1x64x64, ``bench/int8.py``'s model and data, a few epochs), built with ``--calib`` and ``--eval``
  (the first third and the rest of its held-out split) and no other option;
- **no data**: ResNet-18, MobileNetV2 and a ViT-Ti/16-sized ViT at 1x3x224x224 (seeded weights,
  toolchain/models/), built with no data at all (bf16 gated on the build's own samples, the weaker
  proof the manifest records).

Per model it prints every candidate the build tried (backend x precision, its p50 from the build's
own timing, its gate figures or error), the chosen one, and the latency ratios of the chosen
artifact (through ``Session``) against OpenVINO default, OpenVINO pinned to f32, and ONNX Runtime
FP32, all on the same ONNX graph, and LiteRT's interpreter (XNNPACK, its defaults) on the model's
FP32 flatbuffer converted by litert-torch; ``--markdown FILE`` writes the tables for BENCHMARKS.md.

    .venv/bin/python bench/precision.py                       # all (~15-25 min on 2 cores)
    .venv/bin/python bench/precision.py --models resnet18_digits64 --epochs 3

Goal (issue 15): the labelled ResNet-18 within 1 point of FP32 accuracy at <= 0.5x OpenVINO
default's latency on a CPU with bf16; with no data, no slower than OpenVINO default.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()
EDGESMITH = Path(sys.executable).parent / "edgesmith"

NO_DATA = {
    "resnet18": ("edgesmith.toolchain.models.resnet:resnet18", "1,3,224,224"),
    "mobilenet_v2": ("edgesmith.toolchain.models.mobilenet:mobilenet_v2", "1,3,224,224"),
    "vit_small": ("edgesmith.toolchain.models.vit:vit_small", "1,3,224,224"),
}
PEERS = ("openvino-default", "openvino-f32", "ort", "litert")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _int8_bench():
    spec = importlib.util.spec_from_file_location("int8_bench", REPO / "bench" / "int8.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- timing, in child processes ------------------------------------------------------------------

def _measure(kind: str, path: str, threads: int, blocks: int, block: int) -> float:
    """Runs in a child process: ms per inference, best block mean. ``openvino-default`` is exactly
    what OpenVINO's documentation shows; the others are bench/int8.py's (``openvino`` there pins
    f32, ``session`` is edgesmith's device runtime, ``ort`` ONNX Runtime)."""
    bench = _int8_bench()
    if kind == "litert":  # the FP32 flatbuffer (litert-torch), LiteRT's interpreter at its defaults: XNNPACK
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=path, num_threads=threads)
        runner = interpreter.get_signature_runner()
        (name, detail), = runner.get_input_details().items()
        x = np.random.default_rng(0).standard_normal(list(detail["shape"])).astype(np.float32)
        return bench._time(lambda a: runner(**{name: a}), x, blocks, block)
    if kind != "openvino-default":
        return bench._measure({"openvino-f32": "openvino"}.get(kind, kind), path, threads, blocks, block)
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU")
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal(list(compiled.inputs[0].shape)).astype(np.float32)
    print(f"# {kind}: INFERENCE_PRECISION_HINT={compiled.get_property('INFERENCE_PRECISION_HINT')}", file=sys.stderr)
    return bench._time(lambda a: request.infer([a]), x, blocks, block)


def measure_all(engines: dict[str, tuple[str, Path]], threads: int, rounds: int, blocks: int, block: int) -> dict[str, float]:
    """Best block mean per engine over ``rounds`` fresh processes, the engine order rotated per round."""
    best: dict[str, float] = {}
    names = list(engines)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            kind, path = engines[name]
            cmd = [sys.executable, str(THIS), "--measure", kind, str(path), "--threads", str(threads),
                   "--blocks", str(blocks), "--block", str(block)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                log(f"{name}: {result.stderr.strip().splitlines()[-1:]}")
                continue
            value = float(result.stdout.strip().splitlines()[-1])
            best[name] = min(best.get(name, float("inf")), value)
    return best


# --- building ------------------------------------------------------------------------------------

def build(model: str, out: Path, extra: list[str]) -> dict:
    """``edgesmith build MODEL -t host`` with the defaults (precision auto) plus ``extra``."""
    cmd = [str(EDGESMITH), "build", model, "-t", "host", "-o", str(out), "--json", *extra]
    env = {**os.environ, "EDGESMITH_PRECISION": "auto"}
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"build failed: {result.stderr.strip()[-2000:]}")
    report = json.loads(result.stdout)
    report["build_s"] = time.perf_counter() - t0
    return report


def onnx_of(model: str, shape: str | None, work: Path) -> Path:
    import onnx

    from edgesmith.toolchain.sources import load_source, parse_input_shapes

    source = load_source(model, parse_input_shapes([shape]) if shape else [], None)
    path = work / f"{source.name}.onnx"
    onnx.save(source.onnx_model, str(path))
    return path


def tflite_of(model: str, shape: str | None, work: Path) -> Path | None:
    """The model as an FP32 flatbuffer through litert-torch (the tflite backend's converter), or None
    when the converter environment is not installed."""
    from edgesmith.toolchain.bench.engines import _litert
    from edgesmith.toolchain.errors import UserError
    from edgesmith.toolchain.sources import load_source, parse_input_shapes

    source = load_source(model, parse_input_shapes([shape]) if shape else [], None)
    folder = work / f"litert-{source.name}"
    folder.mkdir(exist_ok=True)
    try:
        return _litert(source, folder).path
    except UserError as e:
        log(f"litert peer left out: {e}")
        return None


def run_model(name: str, model: str, shape: str | None, extra: list[str], work: Path, args) -> dict:
    log(f"{name}: edgesmith build (precision auto){' ' + ' '.join(extra) if extra else ''}")
    out = work / f"dist-{name}"
    report = build(model, out, [*(["--input-shape", shape] if shape else []), *extra])
    (artifact,) = report["artifacts"]
    (selection,) = report["selections"]
    threads = json.loads((Path(artifact["path"]) / "manifest.json").read_text())["target"]["threads"]
    onnx_path = onnx_of(model, shape, work)
    log(f"{name}: chose {selection['chosen']} {selection['chosen_precision']}; timing it against the peers "
        f"({args.rounds} rounds, each engine in its own process)")
    engines = {"edgesmith": ("session", Path(artifact["path"])), **{p: (p, onnx_path) for p in PEERS if p != "litert"}}
    tflite_path = tflite_of(model, shape, work)
    if tflite_path is not None:
        engines["litert"] = ("litert", tflite_path)
    times = measure_all(engines, threads, args.rounds, args.blocks, args.block)
    return {"model": name, "artifact": artifact, "selection": selection, "times_ms": times, "build_s": report["build_s"],
            "notes": report["notes"]}


def print_result(r: dict, out) -> None:
    a, sel, t = r["artifact"], r["selection"], r["times_ms"]
    gate = a.get("accuracy") or {}
    print(f"\n### {r['model']}\n", file=out)
    print("| backend | precision | status | p50 at build (µs) | accuracy gate / error |\n| --- | --- | --- | ---: | --- |", file=out)
    for c in sel["candidates"]:
        chosen = c["backend"] == sel["chosen"] and (c.get("precision") or "fp32") == sel["chosen_precision"]
        status = "**chosen**" if chosen else c["status"]
        p50 = f"{c['latency_us_p50']:.1f}" if c.get("latency_us_p50") else "—"
        detail = (c.get("error") or c.get("gate") or "FP32, element-wise against ONNX Runtime").replace("|", "/")
        print(f"| {c['backend']} | {c.get('precision') or 'fp32'} | {status} | {p50} | {detail} |", file=out)
    mine = t.get("edgesmith")
    print("\n| engine | ms / inference | edgesmith's ratio |\n| --- | ---: | ---: |", file=out)
    for name in ("edgesmith", *PEERS):
        if name in t:
            ratio = f"{mine / t[name]:.2f}x" if mine and name != "edgesmith" else "—"
            print(f"| {name}{' (' + a['backend'] + ' ' + a['precision'] + ')' if name == 'edgesmith' else ''} | "
                  f"{t[name]:.3f} | {ratio} |", file=out)
    if gate:
        acc = (f"accuracy {100 * gate['accuracy']:.2f}% against FP32 {100 * gate['reference_accuracy']:.2f}%"
               if gate.get("accuracy") is not None else "")
        agree = f"top-1 agreement {100 * gate['top1_agreement']:.1f}%" if gate.get("top1_agreement") is not None else ""
        print(f"\nGate ({gate['proof']}, {gate['data']['samples']} inputs): {', '.join(x for x in (acc, agree) if x)}.",
              file=out)
    print(f"\nBuild: {r['build_s']:.0f} s.", file=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18_digits64," + ",".join(NO_DATA))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("path", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(_measure(args.measure, args.path, args.threads, args.blocks, args.block))
        return
    load = os.getloadavg()[0]
    log(f"load average {load:.2f}{'' if load < 1 else ' — the machine is busy: figures are not evidence'}")
    results = []
    with tempfile.TemporaryDirectory(prefix="edgesmith-precision-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            if name == "resnet18_digits64":
                bench = _int8_bench()
                ref = bench.train("resnet18", work, args.epochs)
                import mlflow

                from edgesmith.toolchain.sources import load_source

                run_id = load_source(ref).registry.run_id
                data = np.load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="data/test.npz",
                                                                   dst_path=str(work)))
                cut = len(data["x"]) // 3  # calibrate on the first third, judge on the rest
                np.savez(work / "calib.npz", x=data["x"][:cut].astype(np.float32))
                np.savez(work / "eval.npz", x=data["x"][cut:].astype(np.float32), y=data["y"][cut:].astype(np.int64))
                results.append(run_model(name, ref, None, ["--calib", str(work / "calib.npz"), "--eval",
                                                           str(work / "eval.npz")], work, args))
            else:
                model, shape = NO_DATA[name]
                results.append(run_model(name, model, shape, [], work, args))
            print_result(results[-1], sys.stdout)
    load_after = os.getloadavg()[0]
    header = (f"Measured {time.strftime('%Y-%m-%d')} by bench/precision.py on {_cpu()}, 2 threads; load average "
              f"{load:.2f} before and {load_after:.2f} after.")
    print(f"\n{header}")
    if args.markdown:
        with args.markdown.open("w") as f:
            print(header, file=f)
            for r in results:
                print_result(r, f)
        (args.markdown.with_suffix(".json")).write_text(json.dumps(results, indent=2, default=str))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()

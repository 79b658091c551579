"""INT8 vs FP32 per backend on the host target, through edgesmith's own path, against the engines'
own INT8 tooling run directly on the same model.

Models, both trained on real data with ``edgesmith train`` and registered in a throwaway MLflow
store, then built with ``edgesmith build models:/... --quantize int8`` (calibration: the first third
of the registered test split; accuracy: the rest):

- ``digits``: the digits CNN (examples/digits.toml, 1×8×8);
- ``resnet18``: a plain-PyTorch ResNet-18 (11 M parameters, BasicBlocks 2-2-2-2, widths 64-512) on
  the same digits upscaled to 64×64 (``resnet18_64`` below), a few epochs.

Per backend: FP32 and INT8 artifacts timed through ``Session.run`` (the device's C++ runtime),
batch 1, the target's threads, each in its own process (engines' thread pools spin after a call
and tax whatever runs next), best mean of several blocks. Peers on the same ONNX model and the
same calibration inputs: OpenVINO + NNCF directly (``nncf.quantize``, ``core.compile_model`` with
the same hints) and ONNX Runtime QDQ directly (``quantize_static``, ``InferenceSession``), and TVM
Relax on the QDQ model (why edgesmith refuses INT8 for tvm).

    .venv/bin/python bench/int8.py [--models digits,resnet18] [--backends openvino,ort,tvm] [--epochs 3]

Goal (issue 8): INT8 <= 0.55x FP32 on the ResNet-sized model with <= 1 point accuracy drop, and
edgesmith's INT8 artifact no slower than the peers. Figures vary 2-3x with other load on the cores.
"""

from __future__ import annotations

import argparse
import contextlib
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


# --- the ResNet-18-sized model (plain PyTorch) --------------------------------------------------

def resnet18_64():
    """ResNet-18 (torchvision's layout: 7×7/2 stem, max-pool, BasicBlocks 2-2-2-2) for 1×64×64, 10 classes."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.down = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
            blocks, cin = [], 64
            for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                blocks += [Block(cin, width, stride), Block(width, width, 1)]
                cin = width
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(512, 10)

        def forward(self, x):
            return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))

    return ResNet18()


def digits_64(path: Path) -> Path:
    """scikit-learn's digits upscaled (bilinear) to 64×64, as an .npz dataset for edgesmith train."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.nn.functional.interpolate(torch.from_numpy(d.images.astype(np.float32))[:, None], size=(64, 64),
                                        mode="bilinear", align_corners=False)
    np.savez(path, x=x.numpy(), y=d.target.astype(np.int64))
    return path


# --- training and building through edgesmith ---------------------------------------------------

def train(model: str, work: Path, epochs: int) -> str:
    from edgesmith.toolchain.train.config import load_config
    from edgesmith.toolchain.train.run import train_and_register

    config = load_config(REPO / "examples" / "digits.toml")
    if model == "digits":
        config = config.with_overrides(epochs=max(epochs, 10))
    else:
        data = digits_64(work / "digits64.npz")
        config = config.with_overrides(name="resnet18-digits64", model=f"{THIS}:resnet18_64", input_shape=[1, 1, 64, 64],
                                       epochs=epochs, threads=2, lr=0.001, batch_size=32,
                                       dataset={"source": str(data), "normalise": "standardise"})
    t0 = time.perf_counter()
    summary = train_and_register(config, alias="bench", progress=False)
    print(f"# trained {config.name}: test accuracy {summary.test_accuracy:.2%}, {summary.epochs_run} epochs, "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return f"models:/{config.name}/{summary.version}"


def build(ref: str, backend: str, out: Path, quantize: bool) -> tuple[Path | None, str | None]:
    cmd = [str(Path(sys.executable).parent / "edgesmith"), "build", ref, "-t", "host", "--backend", backend,
           "-o", str(out), "--json", *(["--quantize", "int8"] if quantize else [])]
    result = subprocess.run(cmd, capture_output=True, text=True)
    report = json.loads(result.stdout) if result.stdout.strip().startswith("{") else {"artifacts": [], "failures": []}
    if result.returncode != 0 or not report["artifacts"]:
        errors = [f["error"] for f in report["failures"]] or [result.stderr.strip().splitlines()[-1:]]
        return None, str(errors[0])
    return Path(report["artifacts"][0]["path"]), None


# --- timing, each measurement in its own process -----------------------------------------------

def _time(run, x, blocks: int, block: int) -> float:
    for _ in range(3):
        run(x)
    best = float("inf")
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(block):
            run(x)
        best = min(best, (time.perf_counter() - t0) / block)
    return best * 1e3


def _measure(kind: str, path: str, threads: int, blocks: int, block: int) -> float:
    """Runs in a child process: ms per inference, best block mean."""
    if kind == "session":
        from edgesmith.runtime import Session

        session = Session(path, threads=threads)
        spec = session.inputs[0]
        x = np.random.default_rng(0).standard_normal(spec.shape).astype(spec.dtype)
        return _time(lambda a: session.run([a]), x, blocks, block)
    if kind == "openvino":  # an IR saved by NNCF run directly, or the FP32 ONNX
        import openvino as ov

        core = ov.Core()
        # f32 pinned: OpenVINO would pick bf16 by itself on CPUs with AVX512_BF16/AMX, and the FP32 and
        # INT8 peers must not silently become bf16 ones (INT8 IRs run their unquantized layers in f32)
        compiled = core.compile_model(core.read_model(path), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                                                                     "INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        x = np.random.default_rng(0).standard_normal(list(compiled.inputs[0].shape)).astype(np.float32)
        return _time(lambda a: request.infer([a]), x, blocks, block)
    if kind == "ort":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        inp = session.get_inputs()[0]
        x = np.random.default_rng(0).standard_normal(inp.shape).astype(np.float32)
        return _time(lambda a: session.run(None, {inp.name: a}), x, blocks, block)
    if kind == "tvm-relax":  # an ONNX model (FP32 or QDQ) imported into Relax, compiled untuned
        import onnx
        import tvm
        from tvm import relax
        from tvm.relax.frontend import onnx as relax_onnx

        from edgesmith.toolchain.targets import get_target
        from edgesmith.toolchain.backends.tvm import _tvm_target

        model = onnx.load(path)
        vm = relax.VirtualMachine(tvm.compile(relax_onnx.from_onnx(model, keep_params_in_input=False),
                                              target=_tvm_target(get_target("host"))), tvm.cpu())
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
        return _time(lambda a: vm["main"](a), x, blocks, block)
    raise ValueError(kind)


def measure(kind: str, path: Path, threads: int, blocks: int, block: int, rounds: int = 3) -> float | None:
    """Best of ``rounds`` fresh processes: other work on the shared cores only ever adds time."""
    times = [t for t in (_measure_once(kind, path, threads, blocks, block) for _ in range(rounds)) if t is not None]
    return min(times) if times else None


def _measure_once(kind: str, path: Path, threads: int, blocks: int, block: int) -> float | None:
    cmd = [sys.executable, str(THIS), "--measure", kind, str(path), "--threads", str(threads), "--blocks", str(blocks),
           "--block", str(block)]
    env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print(f"# {kind} {path.name}: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return float(result.stdout.strip().splitlines()[-1])


# --- peers: each engine's own INT8 tooling on the same model and calibration inputs -------------

def peers(artifact: Path, work: Path) -> dict[str, Path]:
    """The FP32 ONNX model the artifacts came from, its NNCF IR and its QDQ model, made directly."""
    import nncf
    import onnx
    import openvino as ov

    from edgesmith.toolchain.accuracy import Budget, prepare
    from edgesmith.toolchain.quantize import qdq_onnx
    from edgesmith.toolchain.sources import load_source

    manifest = json.loads((artifact / "manifest.json").read_text())
    source = load_source(manifest["model"]["source"]["ref"])
    plan = prepare(source, [], [], "", None, None, Budget(), need_int8=True)
    fp32 = work / "fp32.onnx"
    onnx.save(source.onnx_model, str(fp32))
    name = source.inputs[0].name
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars
        ov_int8 = nncf.quantize(ov.convert_model(str(fp32)), nncf.Dataset(list(plan.calibration.x[:, None]), lambda x: {name: x}),
                                subset_size=len(plan.calibration.x))
    ov.save_model(ov_int8, str(work / "nncf.xml"), compress_to_fp16=False)
    qdq, _ = qdq_onnx(source.onnx_bytes, name, plan.calibration, work)
    onnx.save(qdq, str(work / "qdq-direct.onnx"))
    return {"fp32": fp32, "nncf": work / "nncf.xml", "qdq": work / "qdq-direct.onnx"}


def bench_model(model: str, backends: list[str], work: Path, args) -> list[dict]:
    ref = train(model, work, args.epochs)
    rows = []
    first_int8 = None
    for backend in backends:
        fp32, _ = build(ref, backend, work / "fp32", False)
        int8, refused = build(ref, backend, work / "int8", True)
        row = {"model": model, "backend": backend, "fp32_ms": None, "int8_ms": None}
        if fp32 is not None:
            m = json.loads((fp32 / "manifest.json").read_text())
            row["threads"] = m["target"]["threads"]
            row["fp32_ms"] = measure("session", fp32, row["threads"], args.blocks, args.block)
        if int8 is not None:
            first_int8 = first_int8 or int8
            q = json.loads((int8 / "manifest.json").read_text())["quantization"]
            row.update(int8_ms=measure("session", int8, row["threads"], args.blocks, args.block),
                       fp32_acc=q["fp32_accuracy"], int8_acc=q["int8_accuracy"], drop=q["accuracy_drop"],
                       agreement=q["top1_agreement"], eval_samples=q["evaluation"]["samples"])
        else:
            row["int8"] = f"refused: {refused}"
        rows.append(row)
    if first_int8 is not None:
        threads = rows[0].get("threads") or 2
        direct = peers(first_int8, work)
        for kind, label, path in (("openvino", "openvino (ONNX direct)", direct["fp32"]),
                                  ("openvino", "openvino+nncf direct", direct["nncf"]),
                                  ("ort", "ort (ONNX direct)", direct["fp32"]), ("ort", "ort QDQ direct", direct["qdq"]),
                                  ("tvm-relax", "tvm relax FP32 (untuned)", direct["fp32"]),
                                  ("tvm-relax", "tvm relax QDQ (untuned)", direct["qdq"])):
            if kind == "tvm-relax" and "tvm" not in backends:
                continue
            rows.append({"model": model, "backend": label, "peer_ms": measure(kind, path, threads, args.blocks, args.block)})
    return rows


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="digits,resnet18")
    parser.add_argument("--backends", default="openvino,ort,tvm")
    parser.add_argument("--epochs", type=int, default=3, help="ResNet training epochs (the digits CNN trains at least 10)")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(_measure(args.measure[0], args.measure[1], args.threads, args.blocks, args.block))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgesmith-int8-bench-") as tmp:
        work = Path(tmp)
        os.environ["EDGESMITH_HOME"] = str(work / "home")  # a throwaway signing key and store
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        for model in args.models.split(","):
            (work / model).mkdir()
            rows += bench_model(model, args.backends.split(","), work / model, args)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':9} {'backend':26} {'FP32 ms':>9} {'INT8 ms':>9} {'ratio':>6} {'FP32 acc':>9} {'INT8 acc':>9} {'agree':>6}")
    for r in rows:
        if "peer_ms" in r:
            print(f"{r['model']:9} {r['backend']:26} {_fmt(r['peer_ms'], '9.3f'):>9}   (peer, run directly)")
            continue
        ratio = r["int8_ms"] / r["fp32_ms"] if r.get("int8_ms") and r.get("fp32_ms") else None
        print(f"{r['model']:9} {r['backend']:26} {_fmt(r['fp32_ms'], '9.3f'):>9} {_fmt(r.get('int8_ms'), '9.3f'):>9} "
              f"{_fmt(ratio, '6.2f'):>6} {_fmt(r.get('fp32_acc'), '9.2%'):>9} {_fmt(r.get('int8_acc'), '9.2%'):>9} "
              f"{_fmt(r.get('agreement'), '6.1%'):>6}" + (f"  {r['int8']}" if "int8" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

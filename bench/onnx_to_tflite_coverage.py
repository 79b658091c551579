"""How much of ONNX's operator conformance cases each ONNX → TFLite route converts correctly.

Routes (issue 15), each run in its own Python environment:

- ``onnx2torch``: ONNX → PyTorch with onnx2torch, then PyTorch → .tflite with litert-torch, the
  route edgesmith's tflite backend takes for ONNX sources (its converter environment,
  ``edgesmith tools install litert``). The PyTorch module's own output is recorded too, so a
  failure is placed in onnx2torch or in litert-torch.
- ``onnx2tf``: ONNX → .tflite with onnx2tf (its default ``flatbuffer_direct`` path, no TensorFlow).

Cases: ``onnx.backend.test.case.node.collect_testcases()`` of the project's onnx wheel, without the
``_expanded`` variants (the same operator spelled as a function body), keeping those whose inputs
are all float32 tensors with static shapes (so no shape/index inputs: those arrive as int64). Each
case's model is converted once and run on the case's first data set; it passes when every output
has the expected shape and is within ``rtol=1e-3, atol=1e-4`` (or the case's own looser bounds) of
the expected output (the android target's fp32 tolerance). onnx2tf may turn 3-5-D tensors
channels-last: an input or output whose shape is the channels-last permutation of the ONNX one is
transposed at the boundary, not counted as a failure.

    # 1. cases from the project's onnx (any environment with onnx):
    #    (--constants: every input but the first becomes an initializer, as weights are in a deployed model)
    .venv/bin/python bench/onnx_to_tflite_coverage.py prepare --out /tmp/cov/cases [--constants] [--sample N]
    # 2. one route per environment (each process converts cases one by one and records a JSON line
    #    per case; a crash or a case silent for --timeout seconds is recorded and the rest resumed):
    .venv/bin/python bench/onnx_to_tflite_coverage.py run --cases /tmp/cov/cases --route onnx2torch \
        --python $EDGESMITH_HOME/tools/litert/bin/python
    #    onnx2tf 2.x needs Python >= 3.12 and pins its own onnx/onnxruntime/ai-edge-litert: a scratch venv,
    #    e.g. python3.12 -m venv /tmp/venv-onnx2tf && /tmp/venv-onnx2tf/bin/pip install onnx2tf==2.6.9
    .venv/bin/python bench/onnx_to_tflite_coverage.py run --cases /tmp/cov/cases --route onnx2tf \
        --python /tmp/venv-onnx2tf/bin/python
    # 3. the table:
    .venv/bin/python bench/onnx_to_tflite_coverage.py report --cases /tmp/cov/cases

Results and the choice they informed: docs/tflite.md; the summaries of the last full run are in
bench/report/onnx_to_tflite_coverage.json.

The worker half of this file (``worker``) runs inside the route's environment and imports nothing
from edgesmith; the onnx2torch route loads toolchain/backends/_litert_convert.py by path, so what
is measured is the conversion edgesmith runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

THIS = Path(__file__).resolve()
RTOL, ATOL = 1e-3, 1e-4


# ---------------------------------------------------------------- prepare (the project's onnx)

def _static_float_inputs(model) -> bool:
    import onnx

    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if not inputs:
        return False
    for value in [*inputs, *model.graph.output]:
        if not value.type.HasField("tensor_type"):
            return False
        dims = value.type.tensor_type.shape.dim
        if not value.type.tensor_type.HasField("shape") or any(not d.HasField("dim_value") for d in dims):
            return False
    return all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in inputs)


def _inputs_to_initializers(model, inputs: list) -> tuple:
    """The case as a deployed model would hold it: the first input stays an input, the others
    (weights, biases, scales, bounds) become initializers with the case's values."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    for value, array in zip(graph_inputs[1:], inputs[1:]):
        model.graph.initializer.append(numpy_helper.from_array(array, value.name))
    kept = graph_inputs[0].name
    for value in [i for i in model.graph.input if i.name != kept]:
        model.graph.input.remove(value)
    return model, inputs[:1]


def prepare(out: Path, sample: int | None, constants: bool = False) -> None:
    import warnings

    import onnx
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    kept = []
    for case in cases:
        if "_expanded" in case.name or not case.data_sets or not _static_float_inputs(case.model):
            continue
        inputs, outputs = case.data_sets[0]
        if not all(isinstance(a, np.ndarray) for a in [*inputs, *outputs]):
            continue
        kept.append(case)
    kept.sort(key=lambda c: c.name)
    if sample and sample < len(kept):
        kept = [kept[i] for i in sorted(set(np.linspace(0, len(kept) - 1, sample).round().astype(int)))]
    out.mkdir(parents=True, exist_ok=True)
    for case in kept:
        directory = out / case.name
        directory.mkdir(exist_ok=True)
        inputs, outputs = case.data_sets[0]
        model = case.model
        if constants:
            model, inputs = _inputs_to_initializers(model, list(inputs))
        onnx.save(model, directory / "model.onnx")
        np.savez(directory / "data.npz", **{f"in_{i}": a for i, a in enumerate(inputs)},
                 **{f"out_{i}": a for i, a in enumerate(outputs)})
        (directory / "case.json").write_text(json.dumps({"rtol": max(RTOL, case.rtol), "atol": max(ATOL, case.atol),
                                                         "ops": sorted({n.op_type for n in case.model.graph.node})}))
    (out / "cases.json").write_text(json.dumps({
        "onnx": onnx.__version__, "collected": len(cases),
        "non_expanded": sum("_expanded" not in c.name for c in cases),
        "kept": [c.name for c in kept], "sampled": bool(sample), "constants": constants}, indent=1))
    print(f"{len(cases)} cases collected, {len(kept)} kept (non-expanded, static shapes, float32 inputs) in {out}")


# ---------------------------------------------------------------- run (parent: restarts the worker)

def run(cases_dir: Path, route: str, python: str, timeout: float) -> None:
    names = json.loads((cases_dir / "cases.json").read_text())["kept"]
    results = cases_dir / f"results-{route}.jsonl"
    done = {json.loads(line)["case"] for line in results.read_text().splitlines()} if results.exists() else set()
    started = time.monotonic()
    while True:
        todo = [n for n in names if n not in done]
        if not todo:
            break
        proc = subprocess.Popen([python, str(THIS), "worker", route, str(cases_dir), *todo],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        size, last = results.stat().st_size if results.exists() else 0, time.monotonic()
        while proc.poll() is None:
            time.sleep(1)
            now_size = results.stat().st_size if results.exists() else 0
            if now_size != size:
                size, last = now_size, time.monotonic()
            elif time.monotonic() - last > timeout:
                os.killpg(proc.pid, 9)
                proc.wait()
        done = {json.loads(line)["case"] for line in results.read_text().splitlines()} if results.exists() else set()
        stuck = next((n for n in todo if n not in done), None)
        if stuck is not None:  # the worker died or hung on this case
            with results.open("a") as f:
                ops = json.loads((cases_dir / stuck / "case.json").read_text())["ops"]
                f.write(json.dumps({"case": stuck, "ops": ops, "stage": "convert", "passed": False,
                                    "error": f"worker crashed or exceeded {timeout:.0f} s (exit {proc.returncode})"}) + "\n")
            done.add(stuck)
        print(f"{route}: {len(done)}/{len(names)} cases, {time.monotonic() - started:.0f} s", file=sys.stderr)


# ---------------------------------------------------------------- worker (inside the route's environment)

def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _close(got, want, rtol, atol) -> str | None:
    got = np.asarray(got)
    if got.shape != want.shape:
        # channels-last permutation of the expected tensor (onnx2tf)
        if want.ndim >= 3 and got.shape == (want.shape[0], *want.shape[2:], want.shape[1]):
            got = np.moveaxis(got, -1, 1)
        else:
            return f"shape {list(got.shape)} instead of {list(want.shape)}"
    if want.dtype == bool or np.issubdtype(want.dtype, np.integer):
        return None if np.array_equal(got.astype(want.dtype), want) else "values differ"
    if not np.allclose(got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True):
        err = np.nanmax(np.abs(got.astype(np.float64) - want.astype(np.float64))) if got.size else 0.0
        return f"max abs error {err:.3g}"
    return None


def _check(outputs: list, expected: list, rtol: float, atol: float) -> str | None:
    if len(outputs) != len(expected):
        return f"{len(outputs)} outputs instead of {len(expected)}"
    for i, (got, want) in enumerate(zip(outputs, expected)):
        problem = _close(got, want, rtol, atol)
        if problem:
            return f"output {i}: {problem}"
    return None


def _fit_input(x: np.ndarray, shape) -> np.ndarray:
    shape = tuple(int(d) for d in shape)
    if x.shape == shape or x.ndim < 3:
        return x
    if shape == (x.shape[0], *x.shape[2:], x.shape[1]):
        return np.asarray(np.moveaxis(x, 1, -1), order="C")
    return x


def _run_tflite(path: str, inputs: list[np.ndarray], onnx_inputs: list[str], onnx_outputs: list[str]) -> list:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    signatures = interpreter.get_signature_list()
    if signatures:
        key = "serving_default" if "serving_default" in signatures else next(iter(signatures))
        runner = interpreter.get_signature_runner(key)
        in_details = runner.get_input_details()
        names = signatures[key]["inputs"]
        # onnx2tf keeps the ONNX names; litert-torch calls them args_0...
        ordered = [n for n in onnx_inputs if n in names] if onnx_inputs and set(onnx_inputs) <= set(names) else sorted(names, key=_natural)
        feeds = {n: _fit_input(x.astype(in_details[n]["dtype"]), in_details[n]["shape"]) for n, x in zip(ordered, inputs)}
        result = runner(**feeds)
        out_names = signatures[key]["outputs"]
        order = [n for n in onnx_outputs if n in out_names] if onnx_outputs and set(onnx_outputs) <= set(out_names) else sorted(out_names, key=_natural)
        return [result[n] for n in order]
    interpreter.allocate_tensors()
    for detail, x in zip(interpreter.get_input_details(), inputs):
        interpreter.set_tensor(detail["index"], _fit_input(x.astype(detail["dtype"]), detail["shape"]))
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


def _converter_script():
    """toolchain/backends/_litert_convert.py, the converter edgesmith runs, loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_litert_convert", THIS.parent.parent / "toolchain" / "backends" / "_litert_convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _error(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:300]}"


def _case_onnx2torch(directory: Path, inputs, expected, meta, scratch: Path) -> dict:
    import litert_torch
    import onnx
    import torch

    convert = _converter_script()
    model = onnx.load(directory / "model.onnx")
    try:
        module, substituted = convert.onnx_to_module(model)
    except Exception as e:
        return {"stage": "onnx2torch", "passed": False, "error": _error(e)}
    return {**_torch_to_tflite(convert, model, module, inputs, expected, meta, scratch), "older_converters": substituted}


def _torch_to_tflite(convert, model, module, inputs, expected, meta, scratch: Path) -> dict:
    import litert_torch
    import torch

    example = tuple(torch.from_numpy(x) for x in inputs)
    try:
        with torch.no_grad():
            out = module(*example)
        out = [out] if isinstance(out, torch.Tensor) else list(out)
        torch_problem = _check([o.numpy() for o in out], expected, meta["rtol"], meta["atol"])
    except Exception as e:
        return {"stage": "torch-run", "passed": False, "error": _error(e)}
    if torch_problem:
        return {"stage": "torch-run", "passed": False, "error": torch_problem}
    path = str(scratch / "model.tflite")
    try:  # as _litert_convert.main does: export with zero inputs of the static shapes, then convert
        args = convert.onnx_example_inputs(model)
        litert_torch.convert(torch.export.export(module, args).module(), args).export(path)
    except Exception as e:
        return {"stage": "litert-torch", "passed": False, "torch_passed": True, "error": _error(e)}
    try:
        outputs = _run_tflite(path, inputs, [], [])
    except Exception as e:
        return {"stage": "tflite-run", "passed": False, "torch_passed": True, "error": _error(e)}
    problem = _check(outputs, expected, meta["rtol"], meta["atol"])
    return {"stage": "tflite-run", "passed": problem is None, "torch_passed": True, "error": problem}


def _case_onnx2tf(directory: Path, inputs, expected, meta, scratch: Path) -> dict:
    import onnx
    import onnx2tf

    model = onnx.load(directory / "model.onnx")
    initializers = {i.name for i in model.graph.initializer}
    onnx_inputs = [i.name for i in model.graph.input if i.name not in initializers]
    onnx_outputs = [o.name for o in model.graph.output]
    out_dir = scratch / "onnx2tf"
    try:
        onnx2tf.convert(input_onnx_file_path=str(directory / "model.onnx"), output_folder_path=str(out_dir),
                        non_verbose=True)
        files = sorted(out_dir.glob("*float32.tflite")) or sorted(out_dir.glob("*.tflite"))
        if not files:
            raise RuntimeError("no .tflite written")
    except BaseException as e:  # onnx2tf calls sys.exit on some failures
        return {"stage": "onnx2tf", "passed": False, "error": _error(e)}
    try:
        outputs = _run_tflite(str(files[0]), inputs, onnx_inputs, onnx_outputs)
    except Exception as e:
        return {"stage": "tflite-run", "passed": False, "error": _error(e)}
    problem = _check(outputs, expected, meta["rtol"], meta["atol"])
    return {"stage": "tflite-run", "passed": problem is None, "error": problem}


def worker(route: str, cases_dir: Path, names: list[str]) -> None:
    import shutil
    import tempfile

    handler = {"onnx2torch": _case_onnx2torch, "onnx2tf": _case_onnx2tf}[route]
    results = cases_dir / f"results-{route}.jsonl"
    for name in names:
        directory = cases_dir / name
        data = np.load(directory / "data.npz")
        inputs = [data[f"in_{i}"] for i in range(sum(k.startswith("in_") for k in data.files))]
        expected = [data[f"out_{i}"] for i in range(sum(k.startswith("out_") for k in data.files))]
        meta = json.loads((directory / "case.json").read_text())
        scratch = Path(tempfile.mkdtemp(prefix="cov-"))
        started = time.monotonic()
        try:
            record = handler(directory, inputs, expected, meta, scratch)
        except BaseException as e:
            record = {"stage": "convert", "passed": False, "error": _error(e)}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        record = {"case": name, "ops": meta["ops"], "seconds": round(time.monotonic() - started, 2), **record}
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- report

def report(cases_dir: Path) -> dict:
    info = json.loads((cases_dir / "cases.json").read_text())
    summary = {"onnx": info["onnx"], "collected": info["collected"], "non_expanded": info["non_expanded"],
               "cases": len(info["kept"]), "sampled": info["sampled"], "constants": info.get("constants", False),
               "routes": {}}
    for path in sorted(cases_dir.glob("results-*.jsonl")):
        route = path.stem.removeprefix("results-")
        records = {r["case"]: r for r in map(json.loads, path.read_text().splitlines())}
        stages = collections.Counter(r["stage"] for r in records.values() if not r["passed"])
        entry = {"tried": len(records), "passed": sum(r["passed"] for r in records.values()),
                 "failed_at": dict(stages.most_common())}
        if route == "onnx2torch":
            entry["torch_passed"] = sum(bool(r.get("torch_passed")) for r in records.values())
            entry["passed_without_older_converters"] = sum(r["passed"] and not r.get("older_converters")
                                                           for r in records.values())
        ops_all = collections.defaultdict(list)
        for r in records.values():
            for op in r.get("ops", []):
                ops_all[op].append(r["passed"])
        entry["operators"] = len(ops_all)
        entry["operators_with_a_passing_case"] = sum(any(v) for v in ops_all.values())
        summary["routes"][route] = entry
    routes = summary["routes"]
    if {"onnx2torch", "onnx2tf"} <= set(routes):
        a = {r["case"] for r in map(json.loads, (cases_dir / "results-onnx2torch.jsonl").read_text().splitlines()) if r["passed"]}
        b = {r["case"] for r in map(json.loads, (cases_dir / "results-onnx2tf.jsonl").read_text().splitlines()) if r["passed"]}
        summary["both_passed"], summary["only_onnx2torch"], summary["only_onnx2tf"] = len(a & b), len(a - b), len(b - a)
    print(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sample", type=int, default=None, help="keep N cases evenly spaced in name order (deterministic)")
    p.add_argument("--constants", action="store_true", help="make every input but the first an initializer "
                   "(weights as in a deployed model: a Conv's W, a Clip's bounds, a Resize's scales)")
    r = sub.add_parser("run")
    r.add_argument("--cases", type=Path, required=True)
    r.add_argument("--route", choices=["onnx2torch", "onnx2tf"], required=True)
    r.add_argument("--python", required=True, help="the route environment's interpreter")
    r.add_argument("--timeout", type=float, default=180.0, help="seconds a case may take")
    w = sub.add_parser("worker")
    w.add_argument("route")
    w.add_argument("cases", type=Path)
    w.add_argument("names", nargs="+")
    s = sub.add_parser("report")
    s.add_argument("--cases", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out, args.sample, args.constants)
    elif args.command == "run":
        run(args.cases, args.route, args.python, args.timeout)
    elif args.command == "worker":
        worker(args.route, args.cases, args.names)
    else:
        report(args.cases)


if __name__ == "__main__":
    main()

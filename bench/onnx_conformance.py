"""ONNX's own operator test cases through edgesmith's build and Session, per backend, against ONNX Runtime.

Every non-expanded case of ``onnx.backend.test.case.node.collect_testcases()`` whose model has static
input shapes and tensor inputs and outputs is built for the host target the way ``edgesmith build
CASE.onnx -t host --backend all --precision fp32 --samples CASE.npz --allow-constant-output`` builds it
(in-process: ``load_source`` → ``run_reference`` → ``choose_backends`` → per candidate ``stage_one``
(compile, validate against ONNX Runtime, prove with edgesmith-run) → ``finish`` (sign, publish); the
latency timing of ``build_target`` is skipped: it decides which candidate a build keeps, not whether
one is correct). Each published artifact is then run by ``edgesmith.runtime.Session`` on the case's
inputs and compared with the case's expected outputs by the project's comparison rule
(``toolchain/validate.py`` ``compare_arrays``, the host target's fp32 tolerance). ONNX Runtime is also
called directly on the same inputs, by the same rule.

Per backend and overall the runner counts: cases ONNX Runtime passes when called directly; built and
correct through edgesmith; refused with a sentence (a ``UserError``; grouped by reason); built but
wrong; internal errors (any other exception, a crash, or a time-out); and tracebacks (anything the
build or Session printed that contains ``Traceback``). What it does not run is counted and named under
"not run, and why": expanded cases (an operator's function body, with its own case), cases without
data sets, dynamic shapes, non-tensor inputs or outputs, and the ``data/light`` CNNs.

Cases run in worker processes (``--jobs``), each case under a time-out (``--timeout``): a hanging or
crashing compiler costs its case, and the worker is restarted on the rest.

    .venv/bin/python bench/onnx_conformance.py [--cases 'test_top_k*'] [--limit N] [--backend ort,openvino]
        [--jobs 1] [--timeout 300] [--json report.json] [--markdown docs/onnx_coverage.md] [--learn]

``--learn`` (on by default for an unfiltered run) merges what the single-operator cases showed into
``toolchain/onnx_conditions.json``, the conditions ``edgesmith check`` reports (toolchain/coverage.py).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

THIS = Path(__file__).resolve()
BACKENDS = ("ort", "openvino", "tvm", "tflite")
OUTCOMES = ("correct", "wrong", "refused", "internal", "skipped")


# ---------------------------------------------------------------- which cases

def all_cases() -> list:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sorted(collect_testcases(), key=lambda c: c.name)


def _why_not_run(case) -> str | None:
    """Why a case is not run (None: it is run)."""
    from onnx import TensorProto

    if "_expanded" in case.name:
        return "expanded: the operator as its ONNX function body (the operator's own case runs)"
    if not case.data_sets:
        return "no data set: the case has a model but no inputs or expected outputs"
    inputs, outputs = case.data_sets[0]
    if not all(isinstance(a, (np.ndarray, np.generic, TensorProto)) for a in [*inputs, *outputs]):
        return "sequence or optional inputs/outputs: edgesmith artifacts take and return tensors"
    initializers = {i.name for i in case.model.graph.initializer}
    graph_inputs = [v for v in case.model.graph.input if v.name not in initializers]
    if len(inputs) != len(graph_inputs):
        return "an omitted optional input: the data set gives fewer inputs than the graph declares"
    for value in case.model.graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            return "sequence or optional inputs/outputs: edgesmith artifacts take and return tensors"
        if not value.type.tensor_type.HasField("shape") or any(
                not d.HasField("dim_value") for d in value.type.tensor_type.shape.dim):
            return "dynamic input shape: the case's model declares no static shape (a user would pass --input-shape)"
    return None


def light_models() -> list[str]:
    """The data/light CNNs shipped with the onnx wheel, if any: never run (constant output)."""
    import onnx

    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    return sorted(p.stem for p in light.glob("*.onnx")) if light.is_dir() else []


def select(cases: list, pattern: str | None = None, limit: int | None = None, sample: int | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """The names of the cases to run (``pattern``: comma-separated fnmatch globs or names) and, by
    reason, the names of the matching cases not run."""
    patterns = [p.strip() for p in (pattern or "*").split(",") if p.strip()]
    run, not_run = [], collections.defaultdict(list)
    for case in cases:
        if not any(fnmatch.fnmatchcase(case.name, p) for p in patterns):
            continue
        why = _why_not_run(case)
        if why:
            not_run[why].append(case.name)
        else:
            run.append(case.name)
    if sample is not None and sample < len(run):
        keep = set(np.linspace(0, len(run) - 1, sample).round().astype(int))
        not_run[f"outside --sample {sample} (evenly spaced in name order)"] = [n for i, n in enumerate(run) if i not in keep]
        run = [n for i, n in enumerate(run) if i in keep]
    if limit is not None and limit < len(run):
        not_run[f"beyond --limit {limit}"] = run[limit:]
        run = run[:limit]
    if pattern is None:
        light = light_models()
        not_run["data/light CNN: weights from ConstantOfShape, so the output is the same for every input "
                "(checks compilation, never correctness)"] = [f"light/{m}" for m in light]
    return run, dict(not_run)


# ---------------------------------------------------------------- one case (in a worker)

@contextlib.contextmanager
def captured(into: list[str]):
    """Everything written to file descriptors 1 and 2 meanwhile (compilers print from C++ too),
    appended to ``into`` as one string."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as log:
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            log.seek(0)
            into.append(log.read().decode(errors="replace"))


def _array(value) -> np.ndarray:
    """A data set's tensor as NumPy (cases of dtypes NumPy lacks, int4 and float8, hold TensorProtos)."""
    from onnx import TensorProto, numpy_helper

    return numpy_helper.to_array(value) if isinstance(value, TensorProto) else np.asarray(value)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def _comparable(a: np.ndarray) -> np.ndarray:
    """float8/int4/... (ONNX Runtime called directly returns them; edgesmith refuses them) as float32,
    which holds their values exactly, so the one comparison rule applies."""
    from edgesmith.toolchain.sources import SUPPORTED_DTYPES

    return a if a.dtype.name in SUPPORTED_DTYPES else a.astype(np.float32)


def matches(got: list, expected: list, atol: float, rtol: float) -> str | None:
    """None when every output matches by the project's rule, else what differs."""
    from edgesmith.toolchain.validate import compare_arrays

    if len(got) != len(expected):
        return f"{len(got)} outputs instead of {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected)):
        g, e = _comparable(np.asarray(g)), _comparable(np.asarray(e))
        result = compare_arrays(g, e, atol, rtol)
        if not result["shapes_match"]:
            return f"output {i} has shape {list(np.shape(g))} instead of {list(np.shape(e))}"
        if not result["passed"]:
            return (f"output {i}: {result['bad_elements']} of {result['elements']} values outside atol={atol:g}, "
                    f"rtol={rtol:g} (max abs error {result['max_abs_err']:.3g})")
    return None


def _ort_direct(case, inputs, expected, atol, rtol) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(case.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        got = session.run(None, dict(zip(names, inputs)))
    except Exception as e:
        return {"passed": False, "error": _first_line(e)}
    try:
        problem = matches(got, expected, atol, rtol)
    except Exception as e:
        return {"passed": False, "error": f"not comparable: {_first_line(e)}"}
    return {"passed": problem is None, "error": problem}


def _single_op(case) -> dict | None:
    """The features of a case with one operator (Constant nodes aside): what toolchain/coverage.py
    learns conditions from."""
    from edgesmith.toolchain import coverage

    found = [n for n in coverage.nodes(case.model) if n.op != "Constant"]
    if len({(n.op, n.domain) for n in found}) != 1:
        return None
    node = found[0]
    merged: dict[str, str] = {}
    for n in found:
        merged.update(coverage.features(n))
    return {"op": node.op, "domain": node.domain, "opset": node.opset, "features": merged}


def run_case(case, backends: tuple[str, ...], work: Path) -> dict:
    """One case through ONNX Runtime directly, then edgesmith's build and Session, per backend."""
    import onnx

    from edgesmith.toolchain.build import BuildOptions, choose_backends, error_message, run_reference
    from edgesmith.toolchain.errors import UserError
    from edgesmith.toolchain.signing import ephemeral_key
    from edgesmith.toolchain.sources import load_source
    from edgesmith.toolchain.targets import get_target

    started = time.monotonic()
    inputs, expected = case.data_sets[0]
    inputs, expected = [_array(a) for a in inputs], [_array(a) for a in expected]
    target = get_target("host")
    tol = target.tolerance_for("fp32")
    record = {"case": case.name, "ops": sorted({n.op_type for n in case.model.graph.node}),
              "ort_direct": _ort_direct(case, inputs, expected, tol.atol, tol.rtol), "backends": {},
              "tracebacks": [], "shared": None}
    single = _single_op(case)
    if single:
        record["single_op"] = single
    directory = Path(tempfile.mkdtemp(prefix=f"{case.name[:40]}-", dir=work))
    try:
        model_path, samples = directory / f"{case.name}.onnx", directory / "samples.npz"
        onnx.save(case.model, str(model_path))
        options = BuildOptions(out_dir=directory / "dist", precision="fp32", samples_path=samples,
                               allow_constant_output=True)
        key = ephemeral_key()
        logs: list[str] = []
        try:  # what every candidate shares: the source, ONNX Runtime's reference, the plan
            with captured(logs):
                source = load_source(str(model_path))  # refuses a dtype edgesmith does not take, before the samples
                np.savez(samples, **{spec.name: np.stack([a]) for spec, a in zip(source.inputs, inputs)})
                ref = run_reference(source, options)
                plan = choose_backends(target, "all", "fp32", ref.data)
        except UserError as e:
            record["shared"] = {"outcome": "refused", "reason": str(e)}
        except Exception as e:
            record["shared"] = {"outcome": "internal", "reason": error_message(e)}
        if "Traceback" in "".join(logs):
            record["tracebacks"].append({"where": "load/reference", "text": _traceback_tail("".join(logs))})
        if record["shared"] is not None:
            for b in backends:
                record["backends"][b] = dict(record["shared"])
            return record
        for backend, precision in plan.candidates():
            if backend not in backends:
                continue
            logs = []
            outcome = _candidate(source, ref, target, backend, precision, options, key, inputs, expected, tol, logs)
            record["backends"][backend] = outcome
            if "Traceback" in "".join(logs):
                record["tracebacks"].append({"where": backend, "text": _traceback_tail("".join(logs))})
        for b in backends:
            record["backends"].setdefault(b, {"outcome": "skipped", "reason": f"host does not list backend {b}"})
        return record
    finally:
        record["seconds"] = round(time.monotonic() - started, 2)
        shutil.rmtree(directory, ignore_errors=True)


def _candidate(source, ref, target, backend, precision, options, key, inputs, expected, tol, logs) -> dict:
    from contextlib import ExitStack

    from edgesmith.runtime import Session
    from edgesmith.toolchain.build import error_message, finish, stage_one
    from edgesmith.toolchain.errors import BackendUnavailable, UserError

    with captured(logs), ExitStack() as stack:
        try:
            staged = stage_one(source, ref, target, backend, options, stack, precision=precision)
            built = finish(source, staged, key, None, None)
        except BackendUnavailable as e:
            return {"outcome": "skipped", "reason": str(e)}
        except UserError as e:
            return {"outcome": "refused", "reason": str(e)}
        except Exception as e:
            return {"outcome": "internal", "reason": error_message(e)}
        try:
            got = Session(built.path, trusted_keys=[key.public_key]).run(inputs)
        except Exception as e:
            return {"outcome": "internal", "reason": f"Session on the built artifact failed: {_first_line(e)}"}
        problem = matches(got, expected, tol.atol, tol.rtol)
        return {"outcome": "wrong", "reason": problem} if problem else {"outcome": "correct"}


def _traceback_tail(text: str) -> str:
    start = text.find("Traceback")
    return text[start:start + 2000]


def worker(names: list[str], backends: tuple[str, ...], results: Path) -> None:
    """Run ``names`` in order, one JSON line each in ``results`` (appended, flushed per case)."""
    by_name = {c.name: c for c in all_cases()}
    work = Path(tempfile.mkdtemp(prefix="onnx-conformance-"))
    try:
        for name in names:
            try:
                record = run_case(by_name[name], backends, work)
            except Exception as e:  # a bug in this runner, not in edgesmith: still a recorded case
                record = {"case": name, "ops": [], "ort_direct": {"passed": False, "error": None}, "tracebacks": [],
                          "backends": {b: {"outcome": "internal", "reason": f"conformance runner: {_first_line(e)}"}
                                       for b in backends}}
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- the parent: workers, time-outs

def _done(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    return {r["case"]: r for r in map(json.loads, path.read_text().splitlines()) if r}


def run_cases(names: list[str], backends: tuple[str, ...] = BACKENDS, jobs: int = 1, timeout: float = 300.0,
              work: Path | None = None, progress=lambda text: None) -> list[dict]:
    """Run the cases in ``jobs`` worker processes; a case that outlives ``timeout`` seconds or
    crashes its worker is recorded as an internal error and the worker restarts on the rest."""
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="onnx-conformance-")) if own else work
    work.mkdir(parents=True, exist_ok=True)
    shares = [names[i::jobs] for i in range(jobs)]
    slots = []
    for i, share in enumerate(shares):
        if share:
            slots.append({"todo": share, "results": work / f"results-{i}.jsonl", "proc": None, "log": work / f"worker-{i}.log"})
    started, reported = time.monotonic(), -1
    try:
        while True:
            running = False
            for slot in slots:
                done = _done(slot["results"])
                todo = [n for n in slot["todo"] if n not in done]
                proc = slot["proc"]
                if proc is not None and proc.poll() is None:
                    running = True
                    size = slot["results"].stat().st_size if slot["results"].exists() else 0
                    if size != slot["size"]:
                        slot["size"], slot["last"] = size, time.monotonic()
                    elif time.monotonic() - slot["last"] > timeout:
                        os.killpg(proc.pid, 9)
                        proc.wait()
                        _record_stuck(slot, todo, backends, f"timed out after {timeout:.0f} s")
                    continue
                if proc is not None and todo and todo[0] == slot.get("first"):
                    # the worker ended without finishing its first case: it crashed on it
                    _record_stuck(slot, todo, backends, f"the worker process crashed (exit status {proc.returncode})")
                    todo = todo[1:]
                if not todo:
                    slot["proc"] = None
                    continue
                with slot["log"].open("a") as log:
                    slot["proc"] = subprocess.Popen(
                        [sys.executable, str(THIS), "worker", "--results", str(slot["results"]),
                         "--backend", ",".join(backends), *todo],
                        stdout=log, stderr=log, start_new_session=True)
                slot["first"], slot["last"] = todo[0], time.monotonic()
                slot["size"] = slot["results"].stat().st_size if slot["results"].exists() else 0
                running = True
            finished = sum(len(_done(s["results"])) for s in slots)
            if finished != reported:
                reported = finished
                progress(f"{finished}/{len(names)} cases, {time.monotonic() - started:.0f} s")
            if not running:
                break
            time.sleep(1)
        records = {}
        for slot in slots:
            records.update(_done(slot["results"]))
        return [records[n] for n in names if n in records]
    finally:
        for slot in slots:
            if slot["proc"] is not None and slot["proc"].poll() is None:
                os.killpg(slot["proc"].pid, 9)
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _record_stuck(slot: dict, todo: list[str], backends, why: str) -> None:
    if not todo:
        return
    record = {"case": todo[0], "ops": [], "ort_direct": {"passed": False, "error": None}, "tracebacks": [],
              "backends": {b: {"outcome": "internal", "reason": why} for b in backends}}
    with slot["results"].open("a") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------- the report

def tidy(text: str | None) -> str | None:
    """A reason without the run's temporary directories: the case's file name stays."""
    return re.sub(r"/\S*/([^/\s]+\.(onnx|npz))", r"\1", text) if text else text


def reason_key(text: str) -> str:
    """A refusal's reason with what differs between cases (paths, names, numbers) blanked, so
    refusals group by the sentence edgesmith says."""
    text = re.sub(r"/\S+", "PATH", text or "")
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\b(test_\w+)", "CASE", text)
    text = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", text)
    return text[:300]


def overall(record: dict) -> str:
    outcomes = [r["outcome"] for r in record["backends"].values()]
    for outcome in ("internal", "correct", "wrong", "refused"):
        if outcome in outcomes:
            return outcome
    return "skipped"


def summarize(records: list[dict], not_run: dict[str, list[str]], backends: tuple[str, ...]) -> dict:
    rows = {}
    for b in (*backends, "overall"):
        counts = collections.Counter()
        for r in records:
            outcome = overall(r) if b == "overall" else r["backends"].get(b, {}).get("outcome", "skipped")
            counts[outcome] += 1
            if r["ort_direct"]["passed"]:
                counts["ort_direct_passed"] += 1
                counts["ort_passed_and_correct"] += outcome == "correct"
            if r["tracebacks"] and (b == "overall" or any(t["where"] in (b, "load/reference") for t in r["tracebacks"])):
                counts["tracebacks"] += 1
        rows[b] = {"cases": len(records), **{k: counts[k] for k in ("ort_direct_passed", "correct", "ort_passed_and_correct",
                                                                    *OUTCOMES[1:], "tracebacks")}}
    refusals = {}
    for b in backends:
        groups = collections.defaultdict(list)
        for r in records:
            result = r["backends"].get(b, {})
            if result.get("outcome") in ("refused", "skipped"):
                groups[reason_key(result.get("reason", ""))].append((r["case"], tidy(result.get("reason", ""))))
        refusals[b] = sorted(({"reason": items[0][1], "pattern": key, "count": len(items), "cases": [c for c, _ in items]}
                              for key, items in groups.items()), key=lambda g: -g["count"])
    problems = {kind: [{"case": r["case"], "backend": b, "reason": tidy(res.get("reason"))}
                       for r in records for b, res in r["backends"].items() if res["outcome"] == kind]
                for kind in ("internal", "wrong")}
    missed = [r["case"] for r in records if r["ort_direct"]["passed"] and overall(r) != "correct"]
    operators = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0]))
    for r in records:
        for op in r["ops"]:
            for b in backends:
                cell = operators[op][b]
                cell[1] += 1
                cell[0] += r["backends"].get(b, {}).get("outcome") == "correct"
    return {"rows": rows, "refusals": refusals, "problems": problems, "ort_passed_not_built_correct": missed,
            "tracebacks": [{"case": r["case"], **t} for r in records for t in r["tracebacks"]],
            "not_run": {why: {"count": len(names), "cases": names} for why, names in not_run.items()},
            "operators": {op: {b: cell for b, cell in per.items()} for op, per in sorted(operators.items())}}


COLUMNS = [("ort_direct_passed", "ORT direct passes"), ("correct", "built and correct"),
           ("ort_passed_and_correct", "of ORT's passes, built and correct"), ("refused", "refused (a sentence)"),
           ("wrong", "wrong"), ("internal", "internal errors"), ("skipped", "skipped (not installed)"),
           ("tracebacks", "tracebacks")]


def print_table(summary: dict, out=sys.stdout) -> None:
    header = ["backend", "cases", *[title for _, title in COLUMNS]]
    print(" | ".join(header), file=out)
    for backend, row in summary["rows"].items():
        print(" | ".join([backend, str(row["cases"]), *[str(row[k]) for k, _ in COLUMNS]]), file=out)
    for kind in ("internal", "wrong"):
        for p in summary["problems"][kind]:
            print(f"{kind}: {p['case']} ({p['backend']}): {p['reason']}", file=out)
    for t in summary["tracebacks"]:
        print(f"traceback: {t['case']} ({t['where']}): {t['text'].splitlines()[-1] if t['text'] else ''}", file=out)
    if summary["ort_passed_not_built_correct"]:
        print(f"ORT passes directly, edgesmith does not build it correctly: {', '.join(summary['ort_passed_not_built_correct'])}", file=out)
    for why, entry in summary["not_run"].items():
        print(f"not run ({entry['count']}): {why}", file=out)


def markdown(summary: dict, meta: dict) -> str:
    lines = ["# ONNX operator coverage per backend", "",
             "Generated by `bench/onnx_conformance.py` (do not edit by hand): ONNX's own operator test cases "
             "(`onnx.backend.test.case.node.collect_testcases()`) built for the host target by every candidate backend "
             "at fp32, then run by `edgesmith.runtime.Session` on the case's inputs and compared with the case's expected "
             "outputs by the project's comparison rule (host fp32 tolerance). `edgesmith check MODEL -t TARGET` answers the "
             "same question for one model without compiling (toolchain/coverage.py; the conditions learnt here are in "
             "toolchain/onnx_conditions.json).", "",
             f"Run: {meta['date']}, onnx {meta['onnx']}, onnxruntime {meta['onnxruntime']}, host target {meta['target']}; "
             f"{meta['run']} cases run{', selection ' + repr(meta['selection']) if meta['selection'] else ''}; "
             f"{meta['seconds']:.0f} s of case time with {meta['jobs']} job(s).", "",
             "## Summary", "",
             "| backend | cases | " + " | ".join(t for _, t in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for backend, row in summary["rows"].items():
        lines.append(f"| {backend} | {row['cases']} | " + " | ".join(str(row[k]) for k, _ in COLUMNS) + " |")
    lines += ["", "*overall*: a case counts once, as correct when some backend built it correctly (what `edgesmith "
              "build --backend auto` keeps is one of the candidates that passed validation), internal when any backend "
              "had an internal error.", ""]
    if summary["ort_passed_not_built_correct"]:
        lines += ["Cases ONNX Runtime passes directly that edgesmith does not build correctly: "
                  + ", ".join(f"`{c}`" for c in summary["ort_passed_not_built_correct"]), ""]
    for kind, title in (("internal", "Internal errors"), ("wrong", "Built but wrong")):
        if summary["problems"][kind]:
            lines += [f"## {title}", ""] + [f"- `{p['case']}` ({p['backend']}): {p['reason']}" for p in summary["problems"][kind]] + [""]
    lines += ["## Refusals by reason", ""]
    for backend, groups in summary["refusals"].items():
        lines += [f"### {backend}", ""]
        if not groups:
            lines += ["none", ""]
            continue
        lines += ["| cases | reason (one example) | cases (first 5) |", "|---|---|---|"]
        for g in groups:
            example = g["reason"].replace("|", "\\|")[:300]
            lines.append(f"| {g['count']} | {example} | {', '.join(g['cases'][:5])} |")
        lines.append("")
    lines += ["## Not run, and why", "", "| cases | why | examples |", "|---|---|---|"]
    for why, entry in summary["not_run"].items():
        lines.append(f"| {entry['count']} | {why} | {', '.join(entry['cases'][:5])} |")
    backends = list(summary["rows"])[:-1]
    lines += ["", "## Per operator", "", "Cases built and correct / cases run that use the operator.", "",
              "| operator | " + " | ".join(backends) + " |", "|---" * (len(backends) + 1) + "|"]
    for op, cells in summary["operators"].items():
        lines.append(f"| {op} | " + " | ".join(f"{cells[b][0]}/{cells[b][1]}" if b in cells else "—" for b in backends) + " |")
    return "\n".join(lines) + "\n"


def learn(records: list[dict], path: Path | None = None) -> int:
    """Merge the single-operator cases' features and per-backend outcomes into the conditions file
    (toolchain/coverage.py reads it); a case run again replaces its entry."""
    from edgesmith.toolchain import coverage

    path = path or coverage.CONDITIONS
    try:
        existing = {c["case"]: c for c in json.loads(path.read_text())["cases"]}
    except (OSError, ValueError, KeyError):
        existing = {}
    for r in records:
        single = r.get("single_op")
        if not single or r.get("shared") is not None or not r["ort_direct"]["passed"]:
            continue  # only cases that reached the backends, with a reference that is right
        results = {b: {"outcome": res["outcome"], **({"reason": res["reason"]} if res.get("reason") else {})}
                   for b, res in r["backends"].items() if res["outcome"] in ("correct", "refused", "wrong")}
        existing[r["case"]] = {"case": r["case"], **single, "results": results}
    about = json.dumps("written by bench/onnx_conformance.py --learn; read by toolchain/coverage.py")
    cases = ",\n".join(json.dumps(existing[k], sort_keys=True) for k in sorted(existing))  # a case a line: readable diffs
    path.write_text(f'{{"about": {about},\n"cases": [\n{cases}\n]}}\n')
    return len(existing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker")
    w.add_argument("--results", type=Path, required=True)
    w.add_argument("--backend", default=",".join(BACKENDS))
    w.add_argument("names", nargs="+")
    parser.add_argument("--cases", default=None, help="comma-separated fnmatch patterns or case names (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="run the first N selected cases (name order)")
    parser.add_argument("--sample", type=int, default=None, help="run N selected cases evenly spaced in name order")
    parser.add_argument("--backend", default="all", help="all, or a comma-separated list of: " + ", ".join(BACKENDS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one case may take")
    parser.add_argument("--json", type=Path, default=None, help="write the summary (and every record) as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the coverage report here (docs/onnx_coverage.md)")
    parser.add_argument("--learn", action=argparse.BooleanOptionalAction, default=None,
                        help="merge the learnt conditions into toolchain/onnx_conditions.json (default: on)")
    parser.add_argument("--work", type=Path, default=None, help="keep the workers' results and logs here")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report what the results in --work hold (an interrupted run's cases so far)")
    args = parser.parse_args()
    if args.command == "worker":
        worker(args.names, tuple(args.backend.split(",")), args.results)
        return
    backends = BACKENDS if args.backend == "all" else tuple(b.strip() for b in args.backend.split(","))
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(unknown)}; use {', '.join(BACKENDS)} or all")
    cases = all_cases()
    names, not_run = select(cases, args.cases, args.limit, args.sample)
    print(f"{len(cases)} cases collected; running {len(names)} on {', '.join(backends)} with {args.jobs} job(s)", file=sys.stderr)
    started = time.monotonic()
    if args.report_only:
        if args.work is None:
            parser.error("--report-only reports the results in --work DIR")
        done = {}
        for path in sorted(args.work.glob("results-*.jsonl")):
            done.update(_done(path))
        missing = [n for n in names if n not in done]
        if missing:
            not_run["not reached: the run was stopped before these cases"] = missing
        records = [done[n] for n in names if n in done]
    else:
        records = run_cases(names, backends, args.jobs, args.timeout, args.work,
                            progress=lambda text: print(f"\r{text}", end="", file=sys.stderr, flush=True))
        print(file=sys.stderr)
    summary = summarize(records, not_run, backends)
    print_table(summary)
    import onnx
    import onnxruntime

    from edgesmith.toolchain.targets import get_target

    meta = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "target": get_target("host").name, "run": len(records), "collected": len(cases),
            "selection": ", ".join(x for x in (args.cases and f"--cases {args.cases}", args.limit and f"--limit {args.limit}",
                                                args.sample and f"--sample {args.sample}") if x),
            "seconds": sum(r.get("seconds", 0) for r in records) if args.report_only else time.monotonic() - started,
            "jobs": args.jobs, "backends": list(backends)}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "summary": summary, "records": records}, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(summary, meta))
    if args.learn is not False:
        print(f"learnt conditions: {learn(records)} single-operator cases in toolchain/onnx_conditions.json", file=sys.stderr)


if __name__ == "__main__":
    main()

"""One engine, timed alone in its own process: ``python -m edgesmith.toolchain.bench._child SPEC.json``.

Engines' thread pools spin after each call, so two engines in one process tax each other; each
measurement is a fresh process that imports only numpy and its own engine. The spec names the
engine kind (``session`` | ``ort`` | ``openvino`` | ``litert``), the model file or artifact, the
thread count, the input samples (.npz) and how many runs; the child writes the outputs it got for
every sample (.npz) and a result JSON: the wall-clock time of its first result (the parent knows
when it spawned the process), load time, and every timed call's latency, and its own peak RSS.
"""

from __future__ import annotations

import json
import sys
import time


def _session(spec: dict):
    from edgesmith.runtime import Session

    session = Session(spec["path"], threads=spec["threads"], trusted_keys=[bytes.fromhex(k) for k in spec["trusted_keys"]])
    return session.run, session.backend


def _ort(spec: dict):
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(spec["path"], options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(inputs):
        return session.run(None, {n: np.asarray(x, order="C") for n, x in zip(names, inputs)})

    return run, f"onnxruntime {ort.__version__}"


def _openvino(spec: dict):
    import numpy as np
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(spec["path"], "CPU", {"INFERENCE_NUM_THREADS": spec["threads"],
                                                       "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()

    def run(inputs):
        results = request.infer([np.asarray(x, order="C") for x in inputs])
        return [np.array(results[output]) for output in compiled.outputs]

    return run, f"openvino {ov.__version__.split('-')[0]}"


def _litert(spec: dict):
    from importlib.metadata import version

    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=spec["path"], num_threads=spec["threads"])
    runner = interpreter.get_signature_runner(spec["signature"])
    input_names, output_names = spec["input_names"], spec["output_names"]

    def run(inputs):
        outputs = runner(**{n: np.asarray(x, order="C") for n, x in zip(input_names, inputs)})
        return [outputs[n] for n in output_names]

    return run, f"ai-edge-litert {version('ai-edge-litert')} (XNNPACK)"


def peak_rss_kib() -> int:
    """This process's own peak resident set (VmHWM). ``getrusage``'s ``ru_maxrss`` would not do:
    Linux carries it across ``execve``, so a child of a large parent reports the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


LOADERS = {"session": _session, "ort": _ort, "openvino": _openvino, "litert": _litert}


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    import numpy as np

    data = np.load(spec["inputs"])
    count = len({key.split("_")[0] for key in data.files})
    samples = [[data[f"s{k}_i{i}"] for i in range(spec["num_inputs"])] for k in range(count)]
    t0 = time.perf_counter()
    run, version = LOADERS[spec["kind"]](spec)
    load_s = time.perf_counter() - t0
    first = run(samples[0])
    first_result_at = time.time()
    outputs = [first] + [run(sample) for sample in samples[1:]]
    np.savez(spec["outputs"], **{f"s{k}_o{j}": np.asarray(y) for k, ys in enumerate(outputs) for j, y in enumerate(ys)})
    for k in range(spec["warmup"]):
        run(samples[k % count])
    latencies = []
    started = time.perf_counter()
    for k in range(spec["iterations"]):
        t = time.perf_counter()
        run(samples[k % count])
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - started
    with open(spec["result"], "w") as f:
        json.dump({"version": version, "first_result_at": first_result_at, "load_s": load_s,
                   "latencies_s": latencies, "timed_wall_s": wall,
                   "peak_rss_kib": peak_rss_kib()}, f)


if __name__ == "__main__":
    main(sys.argv[1])

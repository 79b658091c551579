"""Convert a saved ``torch.export`` program, or an ONNX model, to a .tflite file with litert-torch.

Runs inside the isolated LiteRT converter environment (see ``tflite.py``), never imported by
edgesmith itself: ``python _litert_convert.py MODEL OUT.tflite [CALIB.npy]``, where MODEL is a
``.pt2`` program or a ``.onnx`` model with static input shapes. An ONNX model is turned into a
PyTorch module by onnx2torch first (``onnx_to_module``; bench/onnx_to_tflite_coverage.py measures
this same function on ONNX's operator test cases). With calibration inputs (one model input per
row, batch axis included), the program is quantized to INT8 first: PT2E post-training quantization
with litert-torch's quantizer (symmetric, per-channel weights, static activations), observed on
every row. Prints one JSON line with the flatbuffer's signature input/output names.

A failure the user should read ends with one line ``edgesmith: <sentence>`` on stderr and exit
status 2; the backend turns it into its note.
"""

import json
import sys
import types

EXIT_NOTE = 2


class ConversionRefused(Exception):
    """The converter cannot take this model; the message is one sentence naming why."""


def _torchvision_or_stand_in() -> None:
    """onnx2torch imports torchvision for two operators (NonMaxSuppression, RoiAlign). PyPI's
    torchvision wheels are CUDA builds whose ops do not load against the CPU torch wheel, and the
    import then fails; without working ops those two operators cannot be converted anyway, so a
    stand-in that refuses them by name keeps every other operator convertible."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]

    def missing(operator):
        def refuse(*args, **kwargs):
            raise ConversionRefused(f"the ONNX operator {operator} needs torchvision's ops, which this converter "
                                    "environment lacks")
        return refuse

    torchvision = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.nms = missing("NonMaxSuppression")
    ops.box_convert = missing("NonMaxSuppression")
    ops.roi_align = missing("RoiAlign")
    torchvision.ops = ops
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = torchvision, ops


def onnx_example_inputs(model) -> tuple:
    """Zero tensors of the model's static input shapes and types (shapes are all litert-torch needs)."""
    import numpy as np
    import onnx
    import torch

    initializers = {i.name for i in model.graph.initializer}
    example = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        example.append(torch.from_numpy(np.zeros([d.dim_value for d in tensor_type.shape.dim], dtype=dtype)))
    return tuple(example)


def _older_converters(model) -> list[str]:
    """Let onnx2torch convert an operator at an opset newer than its converters with its newest
    older converter, as long as the older one exists (most newer opsets of an operator only add
    tensor types). A conversion this gets wrong fails edgesmith's validation against ONNX Runtime,
    so it costs a note, never a wrong artifact. Returns what was substituted, for the manifest."""
    from importlib.metadata import version as dist_version

    from onnx import defs
    from onnx2torch.node_converters import registry

    substituted = []
    for node in model.graph.node:
        domain = node.domain or ""
        opset = next((o.version for o in model.opset_import if (o.domain or "") == domain), None)
        try:
            since = defs.get_schema(node.op_type, domain=domain, max_inclusive_version=opset).since_version
        except Exception:
            since = opset
        key = registry.OperationDescription(domain=domain, operation_type=node.op_type, version=since)
        if key in registry._CONVERTER_REGISTRY:
            continue
        older = sorted(d.version for d in registry._CONVERTER_REGISTRY
                       if d.domain == domain and d.operation_type == node.op_type and d.version < since)
        if not older:
            where = "" if domain in ("", "ai.onnx") else f" of domain {domain}"
            raise ConversionRefused(f"onnx2torch {dist_version('onnx2torch')} has no converter for the ONNX operator "
                                    f"{node.op_type}{where} (opset {opset})")
        registry._CONVERTER_REGISTRY[key] = registry._CONVERTER_REGISTRY[key._replace(version=older[-1])]
        substituted.append(f"{node.op_type} (opset {since} converted as opset {older[-1]})")
    return sorted(set(substituted))


def onnx_to_module(model):
    """The ONNX ``ModelProto`` as a ``torch.nn.Module`` (onnx2torch) and the operators converted
    with an older opset's converter; ``ConversionRefused`` names the first operator onnx2torch has
    no converter for at all."""
    _torchvision_or_stand_in()
    from onnx2torch import convert

    substituted = _older_converters(model)
    return convert(model).eval(), substituted


def _load(path: str):
    """The model as (torch.export program, example inputs, notes on the conversion)."""
    import torch

    if path.endswith(".onnx"):
        import onnx

        model = onnx.load(path)
        module, substituted = onnx_to_module(model)
        args = onnx_example_inputs(model)
        try:
            return torch.export.export(module, args), args, substituted
        except Exception as e:
            text = str(e).strip()
            raise ConversionRefused("torch.export could not trace onnx2torch's module of the model: "
                                    f"{text.splitlines()[0] if text else type(e).__name__}") from None
    program = torch.export.load(path)
    args, _ = program.example_inputs
    return program, tuple(args), []


def main() -> None:
    import litert_torch
    import torch

    model_path, out_path = sys.argv[1], sys.argv[2]
    program, args, substituted = _load(model_path)
    if len(sys.argv) > 3:
        import numpy as np
        from litert_torch.quantize import pt2e_quantizer, quant_config
        from torchao.quantization.pt2e import quantize_pt2e

        quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
        module = quantize_pt2e.prepare_pt2e(program.module(), quantizer)
        for row in np.load(sys.argv[3]):
            module(torch.from_numpy(row))
        module = quantize_pt2e.convert_pt2e(module, fold_quantize=False)
        litert_torch.convert(module, args, quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer)).export(out_path)
    else:
        litert_torch.convert(program.module(), args).export(out_path)

    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=out_path)
    signature = interpreter.get_signature_list()["serving_default"]
    # Run it once here, in this throwaway process: LiteRT aborts the whole process on some kernels
    # litert-torch emits (Equal on uint8), and the build validates in-process with the device runtime.
    runner = interpreter.get_signature_runner("serving_default")
    try:
        runner(**{name: np.zeros(d["shape"], d["dtype"]) for name, d in runner.get_input_details().items()})
    except Exception as e:
        text = str(e).strip()
        raise ConversionRefused(f"LiteRT cannot run the converted flatbuffer: {text.splitlines()[0] if text else type(e).__name__}") from None
    print(json.dumps({"inputs": signature["inputs"], "outputs": signature["outputs"], "older_converters": substituted}))


if __name__ == "__main__":
    try:
        main()
    except ConversionRefused as e:
        print(f"edgesmith: {e}", file=sys.stderr)
        sys.exit(EXIT_NOTE)

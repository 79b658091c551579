"""Convert a saved ``torch.export`` program to a .tflite file with litert-torch.

Runs inside the isolated LiteRT converter environment (see ``tflite.py``), never imported by
edgesmith itself: ``python _litert_convert.py PROGRAM.pt2 OUT.tflite [CALIB.npy]``. With
calibration inputs (one model input per row, batch axis included), the program is quantized to
INT8 first: PT2E post-training quantization with litert-torch's quantizer (symmetric, per-channel
weights, static activations), observed on every row. Prints one JSON line with the flatbuffer's
signature input/output names.
"""

import json
import sys


def main() -> None:
    import litert_torch
    import torch

    program_path, out_path = sys.argv[1], sys.argv[2]
    program = torch.export.load(program_path)
    args, _ = program.example_inputs
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
        litert_torch.convert(module, tuple(args), quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer)).export(out_path)
    else:
        litert_torch.convert(program.module(), tuple(args)).export(out_path)

    from ai_edge_litert.interpreter import Interpreter

    signature = Interpreter(model_path=out_path).get_signature_list()["serving_default"]
    print(json.dumps({"inputs": signature["inputs"], "outputs": signature["outputs"]}))


if __name__ == "__main__":
    main()

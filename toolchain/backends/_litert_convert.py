"""Convert a saved ``torch.export`` program to a .tflite file with litert-torch.

Runs inside the isolated LiteRT converter environment (see ``tflite.py``), never imported by
edgesmith itself: ``python _litert_convert.py PROGRAM.pt2 OUT.tflite``. Prints one JSON line with
the flatbuffer's signature input/output names.
"""

import json
import sys


def main() -> None:
    import litert_torch
    import torch

    program_path, out_path = sys.argv[1], sys.argv[2]
    program = torch.export.load(program_path)
    args, _ = program.example_inputs
    litert_torch.convert(program.module(), tuple(args)).export(out_path)

    from ai_edge_litert.interpreter import Interpreter

    signature = Interpreter(model_path=out_path).get_signature_list()["serving_default"]
    print(json.dumps({"inputs": signature["inputs"], "outputs": signature["outputs"]}))


if __name__ == "__main__":
    main()

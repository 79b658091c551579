"""Shadow evaluation rules shared by the device and the central side (docs/shadow.md).

The rule itself is C++ (``csrc/telemetry/shadow_window.h``), applied by the agent before it runs a
candidate; this module is its Python face, so ``edgesmith shadow start`` refuses exactly what a
device would refuse, before it signs anything.
"""

from __future__ import annotations

from edgesmith.runtime.artifact import _core

__all__ = ["shadow_signature_problem"]


def shadow_signature_problem(serving_manifest_json: str, candidate_manifest_json: str) -> str:
    """Why the candidate cannot shadow the serving model, or ``""`` when it can.

    A candidate needs the serving model's inputs and outputs exactly: the same names, dtypes and
    shapes, in the same order. The answer is one sentence naming the first difference and both
    sides. Both arguments are manifest.json texts; raises ``ManifestError`` when one is not a valid
    manifest.
    """
    return _core().shadow_signature_problem(serving_manifest_json, candidate_manifest_json)

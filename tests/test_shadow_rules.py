"""The shadow signature rule as the central side sees it: the device's C++ rule
(csrc/telemetry/shadow_window.h) through edgesmith.runtime.shadow, on real manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy_helpers import make_echo_artifact
from edgesmith.runtime.errors import ManifestError
from edgesmith.runtime.shadow import shadow_signature_problem
from edgesmith.toolchain.signing import SigningKey


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> dict:
    directory = make_echo_artifact(tmp_path_factory.mktemp("shadow") / "serving", SigningKey(seed=bytes(range(32))))
    return json.loads((Path(directory) / "manifest.json").read_text())


def _edited(manifest: dict, edit) -> str:
    candidate = json.loads(json.dumps(manifest))
    edit(candidate)
    return json.dumps(candidate)


def test_same_signature_can_shadow(serving: dict) -> None:
    other_backend = _edited(serving, lambda m: m["backend"].update(name="openvino", version="2026.4.1"))
    assert shadow_signature_problem(json.dumps(serving), other_backend) == ""


def _add_input(m: dict) -> None:
    m["inputs"].append({"name": "z", "dtype": "float32", "shape": [1]})
    m["golden"]["samples"][0]["inputs"].append("golden/sample_0/input_0.npy")


def _rename_output(m: dict) -> None:
    m["outputs"][0]["name"] = "logits"
    m["monitoring"]["outputs"][0]["name"] = "logits"


@pytest.mark.parametrize(("edit", "words"), [
    (lambda m: m["inputs"][0].update(name="image"), ["input 0", "'image'", "'x'"]),
    (lambda m: m["inputs"][0].update(dtype="float16"), ["input 0", "float16", "float32"]),
    (lambda m: m["inputs"][0].update(shape=[2, 4]), ["input 0", "(2, 4)", "(1, 4)"]),
    (_add_input, ["2 inputs", "(x, z)", "1 (x)"]),
    (_rename_output, ["output 0", "'logits'", "'y'"]),
    (lambda m: m["outputs"][0].update(shape=[1, 5]), ["output 0", "(1, 5)", "(1, 4)"]),
    (lambda m: m["outputs"][0].update(dtype="int64"), ["output 0", "int64", "float32"]),
])
def test_each_difference_is_named_with_both_sides(serving: dict, edit, words: list[str]) -> None:
    problem = shadow_signature_problem(json.dumps(serving), _edited(serving, edit))
    assert problem.startswith("the candidate")
    assert "cannot shadow" in problem
    for word in words:
        assert word in problem, (word, problem)


def test_input_difference_is_reported_before_output_difference(serving: dict) -> None:
    def both(m: dict) -> None:
        m["inputs"][0]["name"] = "image"
        _rename_output(m)

    assert "input 0" in shadow_signature_problem(json.dumps(serving), _edited(serving, both))


def test_a_text_that_is_not_a_manifest_is_refused(serving: dict) -> None:
    with pytest.raises(ManifestError):
        shadow_signature_problem(json.dumps(serving), json.dumps({"name": "x"}))

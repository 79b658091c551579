"""EdgeNet, a realistic seeded CNN (3×96×96, residual and depthwise-separable blocks), through the
whole spine: the model itself, `edgesmith build` from PyTorch for the host with tvm and openvino,
validation against ONNX Runtime, and the device Session on fresh inputs and from several threads."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from edgesmith.toolchain.models.edgenet import edgenet, synthetic_images

BACKENDS = ["tvm", "openvino", "ort"]
# The tests with real engines share one set-up, the build for both backends plus the ONNX export
# for the reference: about 70 s here (2 shared cores, other builds running), so they are `slow`.


def _logits(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(images).numpy()


# --- the model (plain torch, no engines) --------------------------------------------------------


def test_edgenet_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    first, again, other = edgenet(), edgenet(), edgenet(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert not torch.equal(first.classifier.weight, other.classifier.weight)
    assert torch.equal(synthetic_images(4, seed=3), synthetic_images(4, seed=3))


def test_batchnorm_statistics_are_those_of_the_data():
    model = edgenet()
    stem_conv, stem_norm = model.features[0], model.features[1]
    with torch.no_grad():
        y = stem_conv(synthetic_images(64, seed=50))  # images the statistics were not measured on
    mean, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3))
    std = stem_norm.running_var.sqrt()
    assert torch.all((mean - stem_norm.running_mean).abs() <= 0.15 * std), (mean, stem_norm.running_mean)
    assert torch.all((var / stem_norm.running_var - 1).abs() <= 0.25), (var, stem_norm.running_var)
    # ...and they are not PyTorch's defaults (mean 0, var 1), which leave random weights unnormalised.
    assert (stem_norm.running_var - 1).abs().max() > 0.1


def test_edgenet_outputs_depend_on_the_input():
    logits = _logits(edgenet(), synthetic_images(64, seed=123))
    assert logits.shape == (64, 10) and np.isfinite(logits).all()
    top1 = np.bincount(logits.argmax(axis=1), minlength=10)
    assert np.count_nonzero(top1) >= 5 and top1.max() <= 32, top1
    # Each logit moves across inputs about as much as the logits of one input differ from each other.
    across = logits.std(axis=0)
    within = logits.std(axis=1).mean()
    assert across.min() > 0.1 and across.mean() > 0.5 * within, (across, within)


# --- built for the host, validated, and run by the device runtime ------------------------------


def _manifest(artifact: dict) -> dict:
    import json

    return json.loads((Path(artifact["path"]) / "manifest.json").read_text())


@pytest.mark.integration
@pytest.mark.slow
def test_edgenet_builds_and_validates_for_the_host(edgenet_artifacts):
    import hashlib

    print(f"edgenet build (tvm + openvino, x86_64-avx2): {edgenet_artifacts['build_s']:.1f} s")
    assert edgenet_artifacts["failures"] == []
    # the --backend all build also published LiteRT's (tests/test_tflite_runtime.py covers that plugin)
    assert set(edgenet_artifacts["artifacts"]) == {("x86_64-avx2", b) for b in [*BACKENDS, "tflite"]}
    onnx_sha256 = hashlib.sha256(edgenet_artifacts["onnx"].SerializeToString()).hexdigest()
    for backend in BACKENDS:
        manifest = _manifest(edgenet_artifacts["artifacts"][("x86_64-avx2", backend)])
        assert manifest["inputs"] == [{"name": "input", "dtype": "float32", "shape": [1, 3, 96, 96]}]
        assert manifest["outputs"][0]["shape"] == [1, 10]
        # The ONNX graph the tests below run in ONNX Runtime is the one this artifact was built from.
        assert manifest["model"]["onnx_sha256"] == onnx_sha256
        validation = manifest["validation"]
        assert validation["status"] == "passed" and validation["samples"] == 8, validation
        assert validation["executed"] == {"isa": "x86_64", "how": "native"}, validation
        assert validation["top1_agreement"] == 1.0 and validation["max_abs_err"] <= validation["atol"], validation
        assert manifest["proof"]["status"] == "proven" and manifest["proof"]["how"] == "native", manifest["proof"]


@pytest.fixture(scope="module", params=BACKENDS)
def edgenet_session(request, edgenet_artifacts):
    from edgesmith.runtime import Session
    from edgesmith.runtime.keys import load_public_key

    path = Path(edgenet_artifacts["artifacts"][("x86_64-avx2", request.param)]["path"])
    return Session(path, trusted_keys=[load_public_key(edgenet_artifacts["pub"])])


def _fresh_inputs(count: int, seed: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(image[None]) for image in synthetic_images(count, seed=seed).numpy()]


@pytest.mark.integration
@pytest.mark.slow
def test_session_matches_onnx_runtime_on_fresh_inputs(edgenet_session, edgenet_artifacts):
    from edgesmith.toolchain.reference import ReferenceModel

    reference = ReferenceModel(edgenet_artifacts["onnx"])
    golden = edgenet_session.manifest["golden"]
    expected_top1 = []
    for x in _fresh_inputs(6, seed=300):  # neither the validation nor the calibration images
        (got,) = edgenet_session.run([x])
        (expected,) = reference.run([x])
        np.testing.assert_allclose(got, expected, atol=golden["atol"], rtol=golden["rtol"])
        assert got.argmax() == expected.argmax()
        expected_top1.append(int(expected.argmax()))
    assert len(set(expected_top1)) >= 2, expected_top1  # the comparison is not of one constant answer


@pytest.mark.integration
@pytest.mark.slow
def test_four_threads_match_serial_runs(edgenet_session):
    xs = _fresh_inputs(8, seed=400)
    serial = [edgenet_session.run([x])[0] for x in xs]
    runs_before = edgenet_session.stats()["runs"]
    mismatches, errors = [], []

    def worker(t: int) -> None:
        try:
            for k in range(2 * len(xs)):
                i = (t + k) % len(xs)  # each thread starts elsewhere, so different inputs overlap
                if not np.array_equal(edgenet_session.run([xs[i]])[0], serial[i]):
                    mismatches.append((t, k, i))
        except Exception as e:  # surfaced below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and mismatches == []
    stats = edgenet_session.stats()
    assert stats["runs"] - runs_before == 4 * 2 * len(xs) and stats["errors"] == 0

"""edgesmith build from the MLflow model registry: models:/NAME/VERSION and models:/NAME@ALIAS, the
manifest's lineage, real held-out samples in the artifact, and the build's own MLflow run.

A digits CNN is trained once (a few epochs) into a real SQLite store for the whole module."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO, run_cli
from edgesmith.toolchain.errors import UserError

EXAMPLE = REPO / "examples" / "digits.toml"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from edgesmith.toolchain.train.config import load_config
    from edgesmith.toolchain.train.run import train_and_register

    store = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    summary = train_and_register(load_config(EXAMPLE).with_overrides(epochs=4), uri, alias="champion", progress=False)
    return {"uri": uri, "summary": summary}


@pytest.fixture
def tracking(registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
    return registry


@pytest.mark.timeout(300)
def test_build_from_registry_records_lineage_real_samples_and_an_mlflow_run(tracking, tmp_path):
    import mlflow

    s = tracking["summary"]
    out = tmp_path / "dist"
    result = json.loads(run_cli("build", f"models:/digits/{s.version}", "-t", "host", "--backend", "openvino",
                                "-o", str(out), "--json").stdout)
    (artifact,) = result["artifacts"]
    path = out / f"digits-{artifact['target']}-openvino"
    manifest = json.loads((path / "manifest.json").read_text())
    source = manifest["model"]["source"]
    assert source["kind"] == "registry" and source["model_uri"] == f"models:/digits/{s.version}"
    assert source["run_id"] == s.run_id and source["dataset_digest"] == s.dataset_digest
    assert source["samples"] == f"registry:{s.run_id}/data/test.npz"
    assert manifest["model"]["version"] == s.version

    # golden samples are the held-out test split's first inputs, in order
    client = mlflow.MlflowClient(tracking["uri"], tracking["uri"])
    test = np.load(mlflow.artifacts.download_artifacts(run_id=s.run_id, artifact_path="data/test.npz", dst_path=str(tmp_path)))
    first = np.load(path / manifest["golden"]["samples"][0]["inputs"][0])
    assert np.array_equal(first, test["x"][:1])
    assert artifact["validation"]["samples"] == min(64, len(test["y"]))
    # all of them are golden: an agent's synthetic load replays what the reference was measured on
    assert len(manifest["golden"]["samples"]) == artifact["validation"]["samples"]
    # the monitoring reference is the trained model's class shares on those real inputs
    shares = manifest["monitoring"]["outputs"][0]["reference"]
    assert sum(shares) == pytest.approx(1.0) and max(shares) < 0.5

    (build_run,) = client.search_runs([client.get_run(s.run_id).info.experiment_id], "tags.`edgesmith.kind` = 'build'")
    assert build_run.info.status == "FINISHED"
    assert build_run.data.tags["edgesmith.model_version_uri"] == f"models:/digits/{s.version}"
    assert build_run.data.tags["edgesmith.validation"] == "passed"
    assert build_run.data.metrics["latency_p50_us"] > 0
    hashes = json.loads(open(mlflow.artifacts.download_artifacts(run_id=build_run.info.run_id,
                                                                 artifact_path="artifact/files_sha256.json",
                                                                 dst_path=str(tmp_path / "h"))).read())
    assert hashes == {f["path"]: f["sha256"] for f in manifest["files"]}
    tags = client.get_model_version("digits", s.version).tags
    assert tags[f"edgesmith.build.{manifest['name']}"] == build_run.info.run_id


@pytest.mark.timeout(120)
def test_alias_resolves_to_its_version(tracking):
    from edgesmith.toolchain.sources import load_source

    source = load_source("models:/digits@champion")
    assert source.registry.uri == f"models:/digits/{tracking['summary'].version}"
    assert source.ref == "models:/digits@champion" and source.name == "digits"
    assert [i.shape for i in source.inputs] == [[1, 1, 8, 8]]
    # the PyTorch model logged with it, for backends converting from PyTorch (tflite): same function
    from edgesmith.toolchain.reference import ReferenceModel

    expected = ReferenceModel(source.onnx_model).run([source.samples[0][0]])[0]
    got = source.module(*source.example_inputs).detach().numpy()
    assert np.allclose(got, expected, atol=1e-4)


@pytest.mark.timeout(120)
def test_unknown_name_version_or_alias_lists_what_exists(tracking):
    from edgesmith.toolchain.sources import load_source

    with pytest.raises(UserError, match=r"no registered model 'digts' .*registered models: digits$"):
        load_source("models:/digts/1")
    with pytest.raises(UserError, match=r"model 'digits' has no version 7; its versions: 1$"):
        load_source("models:/digits/7")
    with pytest.raises(UserError, match=r"model 'digits' has no alias @prod; its aliases: @champion \(version 1\)"):
        load_source("models:/digits@prod")
    with pytest.raises(UserError, match="not a registry reference"):
        load_source("models:/digits")


@pytest.mark.timeout(120)
def test_sample_origin_is_recorded_for_files_and_noise(tracking, tmp_path):
    from edgesmith.toolchain.build import BuildOptions, run_reference
    from edgesmith.toolchain.sources import load_source

    source = load_source("models:/digits/1")
    assert run_reference(source, BuildOptions(out_dir=tmp_path)).origin.startswith("registry:")
    samples = tmp_path / "s.npz"
    np.savez(samples, input=np.random.default_rng(0).standard_normal((3, 1, 1, 8, 8)).astype(np.float32))
    ref = run_reference(source, BuildOptions(out_dir=tmp_path, samples_path=samples))
    assert ref.origin == f"file:{samples}" and len(ref.samples) == 3
    source.samples = None  # a source without data of its own
    assert run_reference(source, BuildOptions(out_dir=tmp_path)).origin == "synthetic N(0,1)"


@pytest.mark.timeout(120)
def test_test_split_missing_is_none_unreadable_is_one_sentence(tracking, tmp_path):
    """Only a run without the artifact means "no split"; a split that cannot be used is an error."""
    import mlflow

    from edgesmith.runtime.manifest import TensorSpec
    from edgesmith.toolchain.registry import RegistryVersion, pytorch_module, test_samples

    mlflow.set_tracking_uri(tracking["uri"])
    spec = [TensorSpec(name="input", dtype="float32", shape=[1, 1, 8, 8])]
    with mlflow.start_run(experiment_id=mlflow.MlflowClient().get_experiment_by_name("edgesmith").experiment_id) as run:
        pass
    bare = RegistryVersion("digits", "1", run.info.run_id, None, tracking["uri"])
    assert test_samples(bare, spec, tmp_path / "a") is None and pytorch_module(bare, tmp_path / "b") is None

    np.savez(tmp_path / "test.npz", inputs=np.zeros((2, 1, 8, 8), np.float32))
    with mlflow.start_run(experiment_id=run.info.experiment_id) as wrong:
        mlflow.log_artifact(str(tmp_path / "test.npz"), artifact_path="data")
    with pytest.raises(UserError, match=r"the test split data/test.npz of models:/digits/1 .*cannot be used \(KeyError"):
        test_samples(RegistryVersion("digits", "1", wrong.info.run_id, None, tracking["uri"]), spec, tmp_path / "c")

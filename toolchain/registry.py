"""The MLflow model registry as a build source, and each build's record back in MLflow.

``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` resolves to a registered version; the build
compiles its ONNX model and, when the training run stored its held-out test split
(``edgesmith train`` does), takes real inputs from it for golden samples and the monitoring
reference instead of noise. Every artifact built from the registry is logged as an MLflow run
tagged with the model version, and the version is tagged with that run: model version → artifacts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.runtime.manifest import TensorSpec
from edgesmith.toolchain.errors import UserError, first_line
from edgesmith.toolchain.sources import ModelSource
from edgesmith.toolchain.train import tracking

MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))$")
# Real held-out inputs taken from the registered test split: enough for a class-frequency
# reference, few enough that validating every backend on them stays quick.
REAL_SAMPLES = 64


@dataclass
class RegistryVersion:
    name: str
    version: str
    run_id: str | None
    dataset_digest: str | None
    tracking_uri: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def is_registry_ref(ref: str) -> bool:
    return ref.startswith("models:/")


def _exists(error: Exception) -> bool:
    return getattr(error, "error_code", "") != "RESOURCE_DOES_NOT_EXIST"


def _missing(error: Exception) -> bool:
    """The run has no such artifact (or no longer exists): not an error, just no data."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and not _exists(error)


def resolve(ref: str, tracking_uri: str | None = None) -> RegistryVersion:
    """The registered version ``ref`` names; an unknown name, version or alias lists what exists."""
    match = MODELS_URI.match(ref)
    if not match:
        raise UserError(f"{ref!r} is not a registry reference; write models:/NAME/VERSION or models:/NAME@ALIAS")
    name, version, alias = match["name"], match["version"], match["alias"]
    uri = tracking.tracking_uri(tracking_uri)
    client = tracking.connect(uri)
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(name)
    except MlflowException as e:
        if _exists(e):
            raise UserError(f"the model registry at {uri} cannot be read ({first_line(e)})") from None
        names = sorted(m.name for m in client.search_registered_models())
        known = ", ".join(names) if names else "none (train one with `edgesmith train CONFIG.toml`)"
        raise UserError(f"no registered model {name!r} in {uri}; registered models: {known}") from None
    versions = sorted((str(v.version) for v in client.search_model_versions(f"name = '{name}'")), key=int)
    if alias is not None:
        aliases = registered.aliases or {}
        if alias not in aliases:
            known = ", ".join(f"@{a} (version {v})" for a, v in sorted(aliases.items())) or "none"
            raise UserError(f"model {name!r} has no alias @{alias}; its aliases: {known}; versions: {', '.join(versions)}")
        version = str(aliases[alias])
    elif version not in versions:
        raise UserError(f"model {name!r} has no version {version}; its versions: {', '.join(versions) or 'none'}")
    mv = client.get_model_version(name, version)
    return RegistryVersion(name=name, version=str(mv.version), run_id=mv.run_id,
                           dataset_digest=(mv.tags or {}).get(tracking.TAG_DATASET), tracking_uri=uri)


def download_onnx(version: RegistryVersion, into: Path) -> Path:
    import mlflow

    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.uri, dst_path=str(into)))
    except Exception as e:
        raise UserError(f"downloading {version.uri} failed ({first_line(e)}); check the artifact store is reachable") from None
    models = sorted(folder.rglob("*.onnx"))
    if not models:
        raise UserError(f"{version.uri} holds no ONNX model; register an ONNX export (edgesmith train does) to build it")
    return models[0]


def test_samples(version: RegistryVersion, inputs: list[TensorSpec], into: Path) -> list[list[np.ndarray]] | None:
    """Held-out inputs from the training run's test split (``x`` of data/test.npz), shaped like the
    model's single input; None when the run stored no split or it does not fit the model."""
    import mlflow

    if version.run_id is None or len(inputs) != 1:
        return None
    try:
        path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=tracking.TEST_SPLIT, dst_path=str(into))
    except Exception as e:
        if _missing(e):
            return None  # a version registered by other tools: no split, synthetic samples then
        raise UserError(f"reading the test split of {version.uri} (run {version.run_id}) failed ({first_line(e)}); "
                        "check the artifact store is reachable and readable") from None
    try:
        with np.load(path, allow_pickle=False) as data:
            x = data["x"]
    except Exception as e:  # not an .npz, no array x, a truncated file...
        raise UserError(f"the test split {tracking.TEST_SPLIT} of {version.uri} (run {version.run_id}) cannot be used "
                        f"({type(e).__name__}: {first_line(e)}); it must be an .npz holding inputs x") from None
    spec = inputs[0]
    if spec.shape[0] != 1 or list(x.shape[1:]) != spec.shape[1:]:
        raise UserError(f"the test split of {version.uri} holds inputs of shape {list(x.shape[1:])}, the model takes {spec.shape[1:]}")
    return [[np.asarray(x[k:k + 1], dtype=spec.dtype, order="C")] for k in range(min(REAL_SAMPLES, len(x)))]


def pytorch_module(version: RegistryVersion, into: Path):
    """The PyTorch model logged next to the ONNX export (``edgesmith train`` logs both), for
    backends that convert from PyTorch (tflite); None when the run has none."""
    import mlflow

    if version.run_id is None:
        return None
    try:
        return mlflow.pytorch.load_model(f"runs:/{version.run_id}/{tracking.PYTORCH_MODEL}", dst_path=str(into))  # an exported program: already in inference mode
    except Exception as e:
        if _missing(e):
            return None
        raise UserError(f"loading the PyTorch model of {version.uri} (run {version.run_id}) failed ({first_line(e)}); "
                        "check the artifact store is reachable and readable") from None


def samples_origin(version: RegistryVersion) -> str:
    return f"registry:{version.run_id}/{tracking.TEST_SPLIT}"


def log_build(version: RegistryVersion, built) -> str:
    """One MLflow run per artifact, in the training run's experiment, tagged with the model version."""
    import mlflow

    client = tracking.connect(version.tracking_uri)
    experiment = client.get_run(version.run_id).info.experiment_id if version.run_id else \
        tracking.experiment_id(client, "edgesmith", version.tracking_uri)
    m = built.manifest
    latency = m.build.latency_us  # measured by the build through the device runtime, where it runs here
    # a tracking server's client prints the run's URL on stdout, which `build --json` keeps for JSON
    with contextlib.redirect_stdout(sys.stderr), \
            mlflow.start_run(experiment_id=experiment, run_name=f"build-{m.name}") as run, tracking.ending_status():
        mlflow.set_tags({"edgesmith.kind": "build", "edgesmith.model_version_uri": version.uri,
                         "edgesmith.model_run_id": version.run_id or "", tracking.TAG_DATASET: version.dataset_digest or "",
                         "edgesmith.validation": m.validation.status, "edgesmith.proof": m.proof.status,
                         "edgesmith.samples": m.model.source.samples or "", "edgesmith.artifact_path": str(built.path)})
        mlflow.log_params({"target": built.target, "backend": built.backend, "precision": m.backend.precision,
                           "backend_version": m.backend.version, "payload_format": m.payload.format})
        metrics = {"build_time_s": built.duration_s, "size_bytes": built.size_bytes,
                   "validation_samples": m.validation.samples}
        for key in ("max_abs_err", "max_rel_err", "top1_agreement"):
            if getattr(m.validation, key) is not None:
                metrics[f"validation_{key}"] = getattr(m.validation, key)
        if latency is not None:
            metrics["latency_p50_us"] = latency
        if m.selection is not None:  # auto / all: every candidate's figure, and why this one
            for candidate in m.selection.candidates:
                if candidate.latency_us_p50 is not None:
                    metrics[f"candidate_{candidate.backend}_latency_p50_us"] = candidate.latency_us_p50
            mlflow.set_tag("edgesmith.selection", m.selection.reason)
        mlflow.log_metrics(metrics)
        mlflow.log_dict({f.path: f.sha256 for f in m.files}, "artifact/files_sha256.json")
        mlflow.log_artifact(str(built.path / "manifest.json"), artifact_path="artifact")
    client.set_model_version_tag(version.name, version.version, f"edgesmith.build.{m.name}", run.info.run_id)
    return run.info.run_id


def load_registry_source(ref: str):
    """A ModelSource for ``models:/...``: the registered ONNX model plus its lineage and real samples."""
    from edgesmith.toolchain.sources import _load_onnx, _safe_name

    version = resolve(ref)
    with tempfile.TemporaryDirectory(prefix="edgesmith-registry-") as tmp:
        onnx_source = _load_onnx(download_onnx(version, Path(tmp) / "onnx"), None)
        samples = test_samples(version, onnx_source.inputs, Path(tmp) / "data")
    source = RegistrySource(**{f.name: getattr(onnx_source, f.name) for f in dataclasses.fields(onnx_source)})
    source.kind, source.ref, source.name = "registry", ref, _safe_name(version.name)
    source.registry = version
    if samples:
        source.samples, source.samples_origin = samples, samples_origin(version)
    return source


class RegistrySource(ModelSource):
    """A registered version. Its PyTorch model (for backends converting from PyTorch: tflite) is
    downloaded on first use only, since most builds never ask for it."""

    _module: Any = None
    _example_inputs: tuple = ()
    _tried = False

    @property
    def module(self):
        if not self._tried and self.registry is not None:
            self._tried = True
            with tempfile.TemporaryDirectory(prefix="edgesmith-registry-") as tmp:
                self._module = pytorch_module(self.registry, Path(tmp))
        return self._module

    @module.setter
    def module(self, value) -> None:
        self._module = value

    @property
    def example_inputs(self) -> tuple:
        import torch

        if self.module is not None and not self._example_inputs:
            generator = torch.Generator().manual_seed(0)
            self._example_inputs = tuple(torch.from_numpy(a) for a in self.samples[0]) if self.samples else \
                tuple(torch.randn(*spec.shape, generator=generator) for spec in self.inputs)
        return self._example_inputs

    @example_inputs.setter
    def example_inputs(self, value: tuple) -> None:
        self._example_inputs = tuple(value)

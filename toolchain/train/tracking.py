"""MLflow for the trainer: where the store is, reaching it, and what a finished model leaves there.

Default store: ``sqlite:///<edgesmith home>/mlflow.db`` with artifacts in ``<home>/mlartifacts``
(an SQLite store keeps artifacts next to its file); ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``
point elsewhere (e.g. a tracking server backed by PostgreSQL).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from edgesmith.runtime.keys import edgesmith_home
from edgesmith.toolchain.errors import UserError, first_line

# Run artifact and model version tag names that builds read back (toolchain/registry.py).
TEST_SPLIT = "data/test.npz"
ONNX_MODEL = "onnx"
PYTORCH_MODEL = "pytorch"
TAG_DATASET = "edgesmith.dataset_digest"
TAG_CONFIG = "edgesmith.config_sha256"
TAG_INPUT = "edgesmith.input_shape"
TAG_EXTRA_DATA = "edgesmith.extra_dataset_digest"  # a labelled captured dataset mixed in (docs/capture.md)
TAG_EXTRA_DEVICES = "edgesmith.extra_dataset_devices"
TAG_ALERT = "edgesmith.alert"


def tracking_uri(explicit: str | None = None) -> str:
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = edgesmith_home()
    return f"sqlite:///{(home / 'mlflow.db').resolve()}"


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def connect(uri: str):
    """Point MLflow at ``uri`` and check it answers; one clear sentence if it does not."""
    # MLflow otherwise reports usage to its maintainers over the network.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    try:
        import mlflow
    except ImportError:
        raise UserError("MLflow is not installed; install the toolchain extra: pip install 'edgesmith[toolchain]'") from None

    # edgesmith prints its own summary; MLflow's INFO lines (registrations, migrations) and
    # torch.export's notes while logging the model would bury it.
    for name in ("mlflow", "alembic", "torch._export", "torch.export"):
        logging.getLogger(name).setLevel(logging.WARNING if name.startswith("mlflow") else logging.ERROR)

    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    elif urlparse(uri).scheme in ("http", "https"):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5)
        except requests.RequestException as e:
            raise UserError(f"the MLflow tracking server {uri} cannot be reached ({type(e).__name__}); "
                            "start it, or pass another --tracking-uri / MLFLOW_TRACKING_URI") from None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient(uri, uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:
        raise UserError(f"the MLflow tracking store {uri} cannot be used ({first_line(e)}); check --tracking-uri / MLFLOW_TRACKING_URI") from None
    return client


def experiment_id(client, name: str, uri: str) -> str:
    """The experiment's id, created on first use; also made the active one, so nested runs land there."""
    import mlflow

    existing = client.get_experiment_by_name(name)
    if existing is not None:
        ident = existing.experiment_id
    else:
        db = sqlite_path(uri)
        location = (db.parent / "mlartifacts" / name).resolve().as_uri() if db is not None else None
        ident = client.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(experiment_id=ident)
    return ident


@contextlib.contextmanager
def deferred_interrupt():
    """Ctrl-C inside (a write to the tracking store) takes effect when it is done, never halfway
    through the store's transaction (a store left mid-write could not then end the run KILLED)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda *_: received.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def ending_status():
    """Inside an active run: Ctrl-C ends it KILLED, any other failure FAILED (never left RUNNING)."""
    import mlflow

    try:
        yield
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise


def log_confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(6, 6))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=list(range(len(classes))), display_labels=classes,
                                            ax=ax, colorbar=False)
    ax.set_title("test split")
    mlflow.log_figure(fig, name)
    plt.close(fig)


def log_dataset(dataset, context: str = "training") -> None:
    import mlflow

    from mlflow.data.code_dataset_source import CodeDatasetSource

    if dataset.source.startswith("sklearn:"):
        source = CodeDatasetSource({"loader": "sklearn.datasets.load_digits"})
    else:
        source = str(Path(dataset.source).resolve())
    ds = mlflow.data.from_numpy(dataset.x, targets=dataset.y, source=source, name=dataset.source, digest=dataset.digest)
    mlflow.log_input(ds, context=context)


def log_extra_dataset(extra, context: str = "training-extra") -> None:
    """The labelled captured dataset as a run input (the same MLflow dataset `data label` logged)."""
    import mlflow

    ds = mlflow.data.from_numpy(extra.x, targets=extra.y, source=extra.path, name=f"capture-{extra.digest[:12]}",
                                digest=extra.digest[:16])
    mlflow.log_input(ds, context=context)


def deployable(model, mean: float, std: float):
    """The model a device runs: ``(x - mean) / std`` (the training split's statistics) followed by
    the trained network, so it takes raw inputs like the ones the data came as."""
    import torch

    class Standardised(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

        def forward(self, x):
            return self.net((x - self.mean) / self.std)

    return Standardised(model).eval()


def export_onnx(model, input_shape: list[int]):
    """Static-shape ONNX of the trained model (input ``input``), checked against PyTorch."""
    import torch

    from edgesmith.toolchain.sources import _check_export, export_to_onnx

    example = (torch.randn(*input_shape, generator=torch.Generator().manual_seed(0)),)
    onnx_model = export_to_onnx(model, example, ["input"])
    _check_export(model, example, onnx_model, "the trained model")
    return onnx_model


def register_version(client, name: str, model_info, run_id: str, tags: dict[str, str], description: str,
                     alias: str | None) -> str:
    """A new version of ``name`` created with its tags in one call; removed again if the alias cannot
    be set, so no half-labelled version is left behind."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    mv = client.create_model_version(name, source=model_info.model_uri, run_id=run_id, tags=tags,
                                     description=description, model_id=model_info.model_id)
    version = str(mv.version)
    if alias:
        try:
            client.set_registered_model_alias(name, alias, version)
        except BaseException:
            client.delete_model_version(name, version)
            raise
    return version


def log_and_register(model, config, splits, dataset, test_accuracy: float, y_pred: np.ndarray, alias: str | None,
                     lineage: dict[str, str] | None = None):
    """The trained model's record in the active run, and a new registered version of it.

    The registered version is the ONNX export (what ``edgesmith build models:/...`` compiles) of the
    model wrapped with its input standardisation, so it takes raw inputs; the PyTorch model (same
    wrapper) and the raw held-out test split are run artifacts next to it.
    """
    import mlflow

    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    mlflow.log_metric("test_accuracy", test_accuracy)
    log_confusion_matrix(splits.test[1], y_pred, splits.classes, "confusion_matrix.png")
    with tempfile.TemporaryDirectory(prefix="edgesmith-train-") as tmp:
        test_file = Path(tmp) / "test.npz"
        np.savez(test_file, x=splits.test_raw, y=splits.test[1])
        mlflow.log_artifact(str(test_file), artifact_path=str(Path(TEST_SPLIT).parent))
    deployed = deployable(model, splits.mean, splits.std)
    requirements = ["torch==2.13.0", "onnx", "onnxruntime"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        mlflow.pytorch.log_model(deployed, name=PYTORCH_MODEL, pip_requirements=requirements,
                                 input_example=splits.test_raw[:1])
        info = mlflow.onnx.log_model(export_onnx(deployed, config.input_shape), name=ONNX_MODEL,
                                     pip_requirements=requirements, save_as_external_data=False)
    tags = {TAG_DATASET: dataset.digest, TAG_CONFIG: config.digest(),
            TAG_INPUT: ",".join(str(d) for d in config.input_shape), "edgesmith.test_accuracy": f"{test_accuracy:.4f}",
            **(lineage or {})}
    return register_version(client, config.name, info, run_id, tags,
                            f"trained by edgesmith on {dataset.source} (digest {dataset.digest}), run {run_id}", alias)

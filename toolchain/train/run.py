"""One training run: data → train (one process, or DDP under torchrun) → MLflow run → registered version."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from edgesmith.toolchain.train import tracking
from edgesmith.toolchain.train.config import TrainConfig
from edgesmith.toolchain.train.data import ExtraData, load_dataset, load_extra, split
from edgesmith.toolchain.train.loop import EpochMetrics, evaluate, train, world
from edgesmith.toolchain.train.tracking import TAG_ALERT, TAG_EXTRA_DATA, TAG_EXTRA_DEVICES


@dataclass
class TrainSummary:
    run_id: str | None
    model_name: str
    version: str | None
    test_accuracy: float
    best_epoch: int
    epochs_run: int
    dataset_digest: str
    duration_s: float
    world_size: int = 1
    best_trial: int | None = None  # searches only
    trials: int | None = None


def flat_params(config: TrainConfig) -> dict[str, str]:
    params = {}
    for key, value in config.model_dump(mode="json", exclude={"search"}).items():
        if isinstance(value, dict):
            params.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            params[key] = value
    return {k: str(v) for k, v in params.items()}


def log_epoch(metrics: EpochMetrics) -> None:
    import mlflow

    with tracking.deferred_interrupt():
        mlflow.log_metrics({"train_loss": metrics.train_loss, "train_accuracy": metrics.train_accuracy,
                            "val_loss": metrics.val_loss, "val_accuracy": metrics.val_accuracy}, step=metrics.epoch)


@contextlib.contextmanager
def epoch_progress(total: int, label: str, enabled: bool = True):
    """A rich progress bar on stderr, advanced once per epoch with the validation accuracy."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not enabled:
        yield lambda m: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[acc]}"),
                  TimeElapsedColumn(), console=Console(stderr=True)) as progress:
        task = progress.add_task(label, total=total, acc="")
        yield lambda m: progress.update(task, advance=1, acc=f"val acc {m.val_accuracy:.2%}")


@contextlib.contextmanager
def process_group():
    """gloo on CPU when launched by torchrun with more than one process."""
    _, size = world()
    if size == 1:
        yield
        return
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def lineage_tags(extra: ExtraData | None, alert: str | None) -> dict[str, str]:
    """What the new model version says it came from, beyond its config and base dataset."""
    tags = {}
    if extra is not None:
        tags.update({TAG_EXTRA_DATA: extra.digest, TAG_EXTRA_DEVICES: ",".join(extra.devices),
                     "edgesmith.extra_samples": str(len(extra.y))})
    if alert:
        tags[TAG_ALERT] = alert
    return tags


def train_and_register(config: TrainConfig, tracking_uri: str | None = None, alias: str | None = None,
                       progress: bool = True, extra_data: str | None = None, alert: str | None = None,
                       datasets_dir=None) -> TrainSummary:
    """``extra_data``: a labelled captured dataset (digest or directory) mixed into every split;
    ``alert``: the alert id this training answers. Both are named in the new version's tags."""
    import mlflow

    started = time.perf_counter()
    rank, size = world()
    lead = rank == 0
    uri = tracking.tracking_uri(tracking_uri)
    if lead:
        client = tracking.connect(uri)
        experiment = tracking.experiment_id(client, config.experiment, uri)
    dataset = load_dataset(config)
    extra = load_extra(extra_data, config, dataset.classes, datasets_dir) if extra_data else None
    splits = split(dataset, config, extra)
    lineage = lineage_tags(extra, alert)
    with process_group():
        if not lead:
            result = train(config, splits)
            return TrainSummary(None, config.name, None, evaluate(result.model, *splits.test)[1], result.best_epoch,
                                len(result.history), dataset.digest, time.perf_counter() - started, size)
        with mlflow.start_run(experiment_id=experiment, run_name=f"{config.name}-train") as run, tracking.ending_status():
            mlflow.set_tags({tracking.TAG_CONFIG: config.digest(), tracking.TAG_DATASET: dataset.digest,
                             "edgesmith.kind": "train", "edgesmith.world_size": str(size), **lineage})
            mlflow.log_params({**flat_params(config), "norm.mean": f"{splits.mean:.6g}", "norm.std": f"{splits.std:.6g}",
                               "world_size": str(size), "train_samples": str(len(splits.train[1]))})
            tracking.log_dataset(dataset)
            if extra is not None:
                tracking.log_extra_dataset(extra)
            with epoch_progress(config.epochs, f"training {config.name}", progress) as advance:
                def on_epoch(m: EpochMetrics) -> None:
                    log_epoch(m)
                    advance(m)

                result = train(config, splits, on_epoch)
            _, test_accuracy, y_pred = evaluate(result.model, *splits.test)
            mlflow.log_metrics({"best_epoch": result.best_epoch, "best_val_accuracy": result.best_val_accuracy})
            version = tracking.log_and_register(result.model, config, splits, dataset, test_accuracy, y_pred, alias,
                                                lineage)
        return TrainSummary(run.info.run_id, config.name, str(version), test_accuracy, result.best_epoch,
                            len(result.history), dataset.digest, time.perf_counter() - started, size)

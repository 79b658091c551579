"""Hyperparameter search with Optuna: TPE sampling, median pruning on per-epoch validation accuracy.

The search is one MLflow parent run; each trial is a child run with its epochs, and keeps its best
weights as an artifact, so the best trial can be registered even if it ran in an earlier,
interrupted session. The Optuna study lives in SQLite next to the MLflow store, named from the
config's hash: running the same command again resumes the search (completed and pruned trials
count towards ``--search N``; a trial cut by Ctrl-C is recorded as failed and run again).
"""

from __future__ import annotations

import time
from pathlib import Path

from edgesmith.runtime.keys import edgesmith_home
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.train import tracking
from edgesmith.toolchain.train.config import TrainConfig
from edgesmith.toolchain.train.data import load_dataset, split
from edgesmith.toolchain.train.loop import build_model, evaluate, train, world
from edgesmith.toolchain.train.run import TrainSummary, flat_params, log_epoch

CHECKPOINT = "checkpoint/state_dict.pt"
TAG_STUDY = "edgesmith.optuna_study"


def optuna_storage(mlflow_uri: str) -> str:
    db = tracking.sqlite_path(mlflow_uri)
    folder = db.parent if db is not None else edgesmith_home()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def study_name(config: TrainConfig) -> str:
    return f"{config.name}-{config.digest()[:16]}"


def suggest(trial, config: TrainConfig) -> dict:
    values = {}
    for key, param in config.search.items():
        if param.kind == "choices":
            values[key] = trial.suggest_categorical(key, param.choices)
        elif param.kind == "int":
            values[key] = trial.suggest_int(key, param.low, param.high, log=param.log)
        else:
            values[key] = trial.suggest_float(key, param.low, param.high, log=param.log)
    return values


def _parent_run(client, experiment: str, name: str) -> str | None:
    """The parent run of an earlier session of this study, to resume under it."""
    runs = client.search_runs([experiment], filter_string=f"tags.`{TAG_STUDY}` = '{name}' and tags.`edgesmith.kind` = 'search'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _save_checkpoint(model) -> None:
    import tempfile

    import mlflow
    import torch

    with tempfile.TemporaryDirectory(prefix="edgesmith-trial-") as tmp:
        path = Path(tmp) / Path(CHECKPOINT).name
        torch.save(model.state_dict(), path)
        mlflow.log_artifact(str(path), artifact_path=str(Path(CHECKPOINT).parent))


def _load_checkpoint(config: TrainConfig, run_id: str):
    import mlflow
    import torch

    model = build_model(config)
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def run_search(config: TrainConfig, trials: int, tracking_uri: str | None = None, alias: str | None = None,
               progress: bool = True) -> TrainSummary:
    import mlflow
    import optuna

    if not config.search:
        raise UserError("--search needs a [search] table in the config (e.g. lr = { low = 1e-4, high = 1e-1, log = true })")
    if world()[1] > 1:
        raise UserError("--search runs in one process; launch it without torchrun")
    started = time.perf_counter()
    uri = tracking.tracking_uri(tracking_uri)
    client = tracking.connect(uri)
    experiment = tracking.experiment_id(client, config.experiment, uri)
    dataset = load_dataset(config)
    splits = split(dataset, config)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a trial cut by Ctrl-C is reported by the run status
    name = study_name(config)
    study = optuna.create_study(study_name=name, storage=optuna_storage(uri), load_if_exists=True, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=config.seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2))
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = max(0, trials - len(study.get_trials(deepcopy=False, states=finished)))

    def objective(trial) -> float:
        trial_config = config.with_overrides(**suggest(trial, config))
        pruned = False
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True) as child, tracking.ending_status():
            trial.set_user_attr("mlflow_run_id", child.info.run_id)
            mlflow.set_tags({TAG_STUDY: name, "edgesmith.kind": "trial", "optuna.trial": str(trial.number)})
            mlflow.log_params(flat_params(trial_config))

            def on_epoch(m) -> None:
                log_epoch(m)
                trial.report(m.val_accuracy, m.epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()

            try:
                result = train(trial_config, splits, on_epoch)
            except optuna.TrialPruned:
                pruned = True
                mlflow.set_tag("optuna.state", "PRUNED")
            else:
                mlflow.set_tag("optuna.state", "COMPLETE")
                mlflow.log_metric("best_val_accuracy", result.best_val_accuracy)
                trial.set_user_attr("best_epoch", result.best_epoch)
                _save_checkpoint(result.model)
        if pruned:
            raise optuna.TrialPruned()
        return result.best_val_accuracy

    parent_id = _parent_run(client, experiment, name)
    with mlflow.start_run(run_id=parent_id, experiment_id=None if parent_id else experiment,
                          run_name=f"{config.name}-search") as parent, tracking.ending_status():
        mlflow.set_tags({TAG_STUDY: name, "edgesmith.kind": "search", tracking.TAG_CONFIG: config.digest(),
                         tracking.TAG_DATASET: dataset.digest})
        if parent_id is None:
            mlflow.log_params({**flat_params(config), "search.trials": str(trials)})
            tracking.log_dataset(dataset)
        _optimise(study, objective, remaining, trials - remaining, trials, progress)
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            raise UserError(f"no trial of study {name} completed; run the search again with more trials")
        best = study.best_trial
        best_config = config.with_overrides(**best.params)
        mlflow.log_params({f"best.{k}": str(v) for k, v in best.params.items()} | {"best.trial": str(best.number)})
        mlflow.log_metric("best_val_accuracy", best.value)
        best_run = best.user_attrs["mlflow_run_id"]
        model = _load_checkpoint(best_config, best_run)
        _, test_accuracy, y_pred = evaluate(model, *splits.test)
        earlier = [v for v in client.search_model_versions(f"name = '{config.name}'") if v.run_id == best_run]
        if earlier:  # a resumed search whose best trial did not change: no duplicate version
            version = earlier[0].version
            if alias:
                client.set_registered_model_alias(config.name, alias, str(version))
        else:
            with mlflow.start_run(run_id=best_run, nested=True), tracking.ending_status():
                version = tracking.log_and_register(model, best_config, splits, dataset, test_accuracy, y_pred, alias)
        mlflow.log_metric("test_accuracy", test_accuracy)
    return TrainSummary(best_run, config.name, str(version), test_accuracy, best.user_attrs.get("best_epoch", 0),
                        len(best.intermediate_values), dataset.digest, time.perf_counter() - started,
                        best_trial=best.number, trials=len(study.trials))


def _optimise(study, objective, remaining: int, done: int, total: int, progress: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not progress:
        study.optimize(objective, n_trials=remaining, catch=())
        return
    with Progress(TextColumn("search"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[best]}"),
                  TimeElapsedColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task("search", total=total, completed=done, best="")

        def advance(study, trial) -> None:
            best = ""
            try:
                best = f"best val acc {study.best_value:.2%}"
            except ValueError:  # no completed trial yet
                pass
            bar.update(task, advance=1, best=best)

        study.optimize(objective, n_trials=remaining, catch=(), callbacks=[advance])

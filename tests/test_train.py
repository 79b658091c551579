"""edgesmith train: config validation, data sources, determinism, MLflow tracking and registration,
Ctrl-C, an unreachable tracking server, DDP under torchrun, and an Optuna search that resumes.

Every MLflow store here is a real SQLite store in a temporary directory."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import EDGESMITH, REPO
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.train.config import load_config

EXAMPLE = REPO / "examples" / "digits.toml"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def _write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _config_text(**top) -> str:
    lines = EXAMPLE.read_text().splitlines()
    for key, value in top.items():
        lines = [f"{key} = {value}" if line.startswith(f"{key} = ") else line for line in lines]
    return "\n".join(lines) + "\n"


def _store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


# --- config and data (no MLflow) ---------------------------------------------------------------

def test_unknown_top_level_key_is_named_with_the_valid_ones(tmp_path):
    path = _write(tmp_path, EXAMPLE.read_text().replace("epochs = 30", "epoch = 30"))
    with pytest.raises(UserError) as e:
        load_config(path)
    message = str(e.value)
    assert "unknown key 'epoch'" in message and "did you mean 'epochs'" in message
    assert "batch_size" in message and "early_stopping" in message and "\n" not in message


def test_unknown_nested_key_lists_that_tables_keys(tmp_path):
    path = _write(tmp_path, EXAMPLE.read_text().replace("test = 0.2", "tset = 0.2"))
    with pytest.raises(UserError, match=r"unknown key 'split.tset'.*valid keys here are: test, val$"):
        load_config(path)
    path = _write(tmp_path, EXAMPLE.read_text().replace("high = 0.03", "hgh = 0.03"))
    with pytest.raises(UserError, match=r"unknown key 'search.lr.hgh' \(did you mean 'high'\?\); valid keys here are: low, high, log, choices"):
        load_config(path)


def test_bad_values_are_one_sentence(tmp_path):
    with pytest.raises(UserError, match="search cannot vary momentum"):
        load_config(_write(tmp_path, EXAMPLE.read_text() + "momentum = { low = 0.5, high = 0.9 }\n"))
    with pytest.raises(UserError, match="required key 'model' is missing"):
        load_config(_write(tmp_path, "\n".join(l for l in EXAMPLE.read_text().splitlines() if not l.startswith("model ="))))
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("old, new, message", [
    ('batch_size = { choices = [32, 64, 128] }', 'optimiser = { choices = ["adam", "rmsprop"] }',
     r"search.optimiser: choice 'rmsprop' is not a valid optimiser \(Input should be 'adam', 'adamw' or 'sgd'\)$"),
    ('batch_size = { choices = [32, 64, 128] }', 'epochs = { low = 1.5, high = 4 }',
     r"search.epochs: epochs is an integer, so its range needs integer low and high \(got 1.5 and 4\)$"),
    ('batch_size = { choices = [32, 64, 128] }', 'batch_size = { low = 0, high = 128 }',
     r"search.batch_size: low 0 is not a valid batch_size \(Input should be greater than or equal to 1\)$"),
    ('lr = { low = 0.0003, high = 0.03, log = true }', 'lr = { low = -1, high = 0.03 }',
     r"search.lr: low -1 is not a valid lr"),
])
def test_bad_search_space_is_refused_when_the_config_loads(tmp_path, old, new, message):
    """Every value a trial can draw passes the trial's override path, or the config is refused."""
    text = EXAMPLE.read_text()
    assert old in text
    with pytest.raises(UserError, match=message) as e:
        load_config(_write(tmp_path, text.replace(old, new)))
    assert "\n" not in str(e.value)
    good = load_config(_write(tmp_path, text.replace(old, 'epochs = { low = 2, high = 4 }')))
    assert good.search["epochs"].kind == "int"


def _bad_inputs(tmp_path: Path, case: str):
    """(config path or config, what to call) for one bad input; see the parametrize list below."""
    from edgesmith.toolchain.train.data import load_dataset, split
    from edgesmith.toolchain.train.loop import train

    rng = np.random.default_rng(0)
    cfg = load_config(EXAMPLE).with_overrides(epochs=1)

    def dataset(**arrays):
        path = tmp_path / "d.npz"
        np.savez(path, **arrays)
        return cfg.with_overrides(dataset={"source": str(path)})

    def trains(c):
        return lambda: train(c, split(load_dataset(c), c))

    if case == "directory":
        return lambda: load_config(tmp_path)
    if case == "binary":
        (tmp_path / "c.toml").write_bytes(bytes(range(256)))
        return lambda: load_config(tmp_path / "c.toml")
    if case == "npy":
        np.save(tmp_path / "d.npy", rng.random((30, 64)))
        return lambda: load_dataset(cfg.with_overrides(dataset={"source": str(tmp_path / "d.npy")}))
    if case == "empty":
        return lambda: load_dataset(dataset(x=np.zeros((0, 64), np.float32), y=np.zeros(0, np.int64)))
    if case == "negative":
        return lambda: load_dataset(dataset(x=rng.random((30, 64)), y=np.repeat(np.arange(-1, 2), 10)))
    if case == "too_many_classes":  # the digits CNN gives 10 logits
        return trains(dataset(x=rng.random((120, 64)), y=np.repeat(np.arange(12), 10)))
    if case == "input_shape":  # the same 64 values per input, but 2 channels where the CNN takes 1
        return trains(dataset(x=rng.random((60, 64)), y=np.repeat(np.arange(3), 20)).with_overrides(input_shape=[1, 2, 4, 8]))
    raise AssertionError(case)


@pytest.mark.parametrize("case, message", [
    ("directory", r"is a directory; pass a TOML file"),
    ("binary", r"is not text \(not UTF-8\); pass a TOML file"),
    ("npy", r"is a single \.npy array, not an \.npz with x and y"),
    ("empty", r"holds no samples"),
    ("negative", r"labels must be 0 or more \(class indices\); y holds -1"),
    ("too_many_classes", r"gives 10 outputs but the dataset has 12 classes"),
    ("input_shape", r"fails on an input of shape \[1, 2, 4, 8\] .*check input_shape in the config"),
])
def test_bad_files_data_and_shapes_are_one_sentence(tmp_path, case, message):
    with pytest.raises(UserError, match=message) as e:
        _bad_inputs(tmp_path, case)()
    assert "\n" not in str(e.value)


def test_config_hash_follows_values_not_formatting(tmp_path):
    a = load_config(EXAMPLE)
    b = load_config(_write(tmp_path, "# a comment\n" + EXAMPLE.read_text()))
    assert a.digest() == b.digest()
    assert a.with_overrides(seed=1).digest() != a.digest()


def test_npz_and_image_folder_datasets(tmp_path):
    from PIL import Image

    from edgesmith.toolchain.train.data import load_dataset, split

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.random((60, 64)), y=np.repeat(np.arange(3), 20))
    cfg = load_config(EXAMPLE).with_overrides(dataset={"source": str(tmp_path / "d.npz")})
    data = load_dataset(cfg)
    assert data.x.shape == (60, 1, 8, 8) and data.classes == ["0", "1", "2"]
    parts = split(data, cfg)
    assert len(parts.train[0]) + len(parts.val[0]) + len(parts.test[0]) == 60
    assert abs(float(parts.train[0].mean())) < 1e-5  # standardised with the training split's statistics

    np.savez(tmp_path / "bad.npz", inputs=rng.random((4, 64)))
    with pytest.raises(UserError, match="needs arrays named x"):
        load_dataset(cfg.with_overrides(dataset={"source": str(tmp_path / "bad.npz")}))

    for label in ("cat", "dog"):
        (tmp_path / "img" / label).mkdir(parents=True)
        for k in range(5):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "img" / label / f"{k}.png")
    images = load_dataset(cfg.with_overrides(dataset={"source": str(tmp_path / "img")}))
    assert images.x.shape == (10, 1, 8, 8) and images.classes == ["cat", "dog"] and list(images.y) == [0] * 5 + [1] * 5


# --- training and tracking -------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.timeout(300)
def test_same_config_and_seed_give_identical_weights():
    import torch

    from edgesmith.toolchain.train.data import load_dataset, split
    from edgesmith.toolchain.train.loop import train

    cfg = load_config(EXAMPLE).with_overrides(epochs=1)
    splits = split(load_dataset(cfg), cfg)
    a, b = train(cfg, splits).model.state_dict(), train(cfg, splits).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other_cfg = cfg.with_overrides(seed=1)
    c = train(other_cfg, split(load_dataset(other_cfg), other_cfg)).model.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The example config trained once, as shipped, into a fresh SQLite store."""
    from edgesmith.toolchain.train.run import train_and_register

    store = tmp_path_factory.mktemp("mlflow")
    uri = _store(store)
    summary = train_and_register(load_config(EXAMPLE), uri, alias="champion", progress=False)
    return {"uri": uri, "dir": store, "summary": summary}


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_digits_reaches_97_percent_tracked_and_registered(trained):
    import mlflow

    s = trained["summary"]
    assert s.test_accuracy >= 0.97, s
    client = mlflow.MlflowClient(trained["uri"], trained["uri"])
    run = client.get_run(s.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.003" and run.data.params["dataset.source"] == "sklearn:digits"
    assert run.data.metrics["test_accuracy"] == pytest.approx(s.test_accuracy)
    history = client.get_metric_history(s.run_id, "val_accuracy")
    assert [m.step for m in history] == list(range(1, s.epochs_run + 1))
    files = {a.path for a in client.list_artifacts(s.run_id)} | {a.path for a in client.list_artifacts(s.run_id, "data")}
    assert {"confusion_matrix.png", "data/test.npz"} <= files
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == s.dataset_digest and dataset_input.tags[0].value == "training"
    version = client.get_model_version("digits", s.version)
    assert version.run_id == s.run_id
    assert version.tags["edgesmith.dataset_digest"] == s.dataset_digest
    assert version.tags["edgesmith.config_sha256"] == load_config(EXAMPLE).digest()
    assert str(client.get_model_version_by_alias("digits", "champion").version) == s.version
    # artifacts stay next to the SQLite store, not in the working directory
    assert (trained["dir"] / "mlartifacts").is_dir() and not (Path.cwd() / "mlruns").exists()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_registered_onnx_takes_raw_inputs_and_keeps_the_test_accuracy(trained, tmp_path):
    """The registered model carries its standardisation: the raw held-out split through the
    registered ONNX (ONNX Runtime) gives the logged test accuracy."""
    import mlflow
    import onnxruntime as ort

    s = trained["summary"]
    client = mlflow.MlflowClient(trained["uri"], trained["uri"])
    mlflow.set_tracking_uri(trained["uri"])
    test = np.load(mlflow.artifacts.download_artifacts(run_id=s.run_id, artifact_path="data/test.npz", dst_path=str(tmp_path)))
    x, y = test["x"], test["y"]
    assert x.min() >= 0 and x.max() > 10  # raw digits pixels (0..16), not standardised values
    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/digits/{s.version}", dst_path=str(tmp_path / "m")))
    (onnx_file,) = folder.rglob("*.onnx")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    pred = np.array([session.run(None, {"input": x[k:k + 1]})[0].argmax() for k in range(len(x))])
    accuracy = float((pred == y).mean())
    assert accuracy >= 0.97 and accuracy == pytest.approx(client.get_run(s.run_id).data.metrics["test_accuracy"])


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_failed_alias_leaves_no_version_behind(trained):
    """Tags go in with the version; if the alias cannot be set the new version is deleted again."""
    import types

    import mlflow
    from mlflow.exceptions import MlflowException

    from edgesmith.toolchain.train.tracking import register_version

    s = trained["summary"]
    client = mlflow.MlflowClient(trained["uri"], trained["uri"])
    existing = client.get_model_version("digits", s.version)
    assert existing.tags["edgesmith.test_accuracy"] == f"{s.test_accuracy:.4f}"
    before = sorted(str(v.version) for v in client.search_model_versions("name = 'digits'"))
    info = types.SimpleNamespace(model_uri=existing.source, model_id=existing.model_id)
    with pytest.raises(MlflowException):  # MLflow reserves 'latest'
        register_version(client, "digits", info, s.run_id, {"k": "v"}, "again", alias="latest")
    assert sorted(str(v.version) for v in client.search_model_versions("name = 'digits'")) == before


def _epoch_logged(db: Path) -> bool:
    try:
        with sqlite3.connect(db) as con:
            return con.execute("select count(*) from metrics where key = 'val_accuracy'").fetchone()[0] > 0
    except sqlite3.Error:
        return False


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_ctrl_c_ends_the_run_killed(tmp_path):
    import mlflow

    uri = _store(tmp_path)
    cfg = str(_write(tmp_path, _config_text(epochs=500).replace("patience = 6", "patience = 500")))
    # A shell's background job starts with SIGINT ignored, and Python then never installs its
    # KeyboardInterrupt handler: give the trainer the default disposition, as a terminal would.
    proc = subprocess.Popen([sys.executable, "-m", "edgesmith.toolchain.train", cfg, "--tracking-uri", uri],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 90
        while not _epoch_logged(tmp_path / "mlflow.db"):  # raw SQL: an MLflow client would race the schema set-up
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("training never logged an epoch")
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    client = mlflow.MlflowClient(uri)
    assert proc.returncode == 130, err
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"
    assert "Traceback" not in err


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_unreachable_tracking_server_is_one_sentence(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    result = subprocess.run([EDGESMITH, "train", str(EXAMPLE), "--tracking-uri", f"http://127.0.0.1:{port}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot be reached" in result.stderr, result.stderr


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_two_processes_rank0_logs_and_registers(tmp_path):
    import mlflow

    from edgesmith.toolchain.train.data import load_dataset, split
    from edgesmith.toolchain.train.loop import DUMP_ENV

    uri = _store(tmp_path)
    dump = tmp_path / "ranks"
    # its own session, so a hang is cleaned up with both workers, not just the launcher
    proc = subprocess.Popen([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "edgesmith.toolchain.train",
                             str(EXAMPLE), "--epochs", "1", "--tracking-uri", uri, "--json"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", DUMP_ENV: str(dump)})
    try:
        _, err = proc.communicate(timeout=280)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    client = mlflow.MlflowClient(uri, uri)
    (run,) = client.search_runs([client.get_experiment_by_name("edgesmith").experiment_id])
    assert run.data.tags["edgesmith.world_size"] == "2" and run.data.params["world_size"] == "2"
    assert run.info.status == "FINISHED"
    assert [str(v.version) for v in client.search_model_versions("name = 'digits'")] == ["1"]  # only rank 0 registers
    # each rank trained on its own half of the training split and ended with the same weights
    ranks = [json.loads((dump / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    halves = [set(r["indices"]) for r in ranks]
    cfg = load_config(EXAMPLE)
    train_size = len(split(load_dataset(cfg), cfg).train[1])
    assert not halves[0] & halves[1] and ranks[0]["samples"] == ranks[1]["samples"] == train_size // 2
    assert halves[0] | halves[1] <= set(range(train_size)) and len(halves[0] | halves[1]) >= train_size - 1


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_search_parent_child_runs_best_registered_and_resumes(tmp_path):
    import mlflow
    import optuna

    from edgesmith.toolchain.train.search import optuna_storage, run_search, study_name

    uri = _store(tmp_path)
    cfg = load_config(EXAMPLE).with_overrides(epochs=2)
    first = run_search(cfg, 2, uri, progress=False)
    client = mlflow.MlflowClient(uri, uri)
    experiment = client.get_experiment_by_name("edgesmith").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`edgesmith.kind` = 'search'")
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and {c.data.tags["edgesmith.kind"] for c in children} == {"trial"}
    assert first.run_id in {c.info.run_id for c in children}
    assert client.get_model_version("digits", first.version).run_id == first.run_id
    assert (tmp_path / "optuna.db").exists()

    second = run_search(cfg, 3, uri, progress=False)  # same config: the same study, one more trial
    study = optuna.load_study(study_name=study_name(cfg), storage=optuna_storage(uri))
    assert len(study.trials) == 3 and second.trials == 3
    (parent_again,) = client.search_runs([experiment], "tags.`edgesmith.kind` = 'search'")
    assert parent_again.info.run_id == parent.info.run_id
    assert len(client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")) == 3

"""`edgesmith loop` (docs/loop.md) on real agents, a real Mosquitto, the real monitor, capture receiver,
trainer, builder, shadow and rollout: a device fed rotated digits drifts, its retrain request is carried
from capture to a canary rollout of the retrained model; the loop killed mid-way resumes without doing a
step again, and a failed gate stops it with one sentence, after which it resumes at that step.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import EDGESMITH, REPO
from edgesmith.toolchain.signing import generate_deploy_key
from test_agent import Agent, broker  # noqa: F401  (fixture: a real Mosquitto, down at teardown)
from test_fleet_monitor import FLEET, MonitorProcess, wait_until
from test_retrain_request import digits_served  # noqa: F401  (fixture: the trained digits CNN, built)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROTATED = 300  # distinct rotated digits the drifted camera replays


def _steps(db: str, request_id: str) -> dict:
    from edgesmith.toolchain.fleet.store import Store, retrain

    return retrain.steps(Store.open(db, create=False), request_id)


def _request(db: str, request_id: str) -> dict:
    from edgesmith.toolchain.fleet.store import Store, retrain

    return retrain.get(Store.open(db, create=False), request_id)


def test_loop_closes_a_drift_alert_resumes_after_a_kill_and_stops_at_a_failed_gate(
        digits_served, digits_trained, session_home, broker, tmp_path):  # noqa: F811
    from sklearn.datasets import load_digits

    # The drifted camera: 300 digits rotated by 90 degrees; the labelling source knows each one's label,
    # keyed by the input's content digest (it cannot know the ids the devices' samples will get).
    digits = load_digits()
    x = digits.images[:ROTATED].astype(np.float32)[:, None]
    rotated = np.ascontiguousarray(np.rot90(x, 1, axes=(2, 3)))
    np.save(tmp_path / "rotated.npy", rotated)
    oracle = tmp_path / "oracle.csv"
    oracle.write_text("id,class\n" + "".join(f"{hashlib.sha256(r.tobytes()).hexdigest()},{int(c)}\n"
                                              for r, c in zip(rotated, digits.target[:ROTATED])))
    config = tmp_path / "digits.toml"
    config.write_text((REPO / "examples" / "digits.toml").read_text().replace("epochs = 30", "epochs = 4"))
    registry = tmp_path / "mlflow.db"  # a copy: the shared registry's versions stay as other tests expect
    shutil.copy(digits_trained["uri"].removeprefix("sqlite:///"), registry)

    deploy_key = generate_deploy_key(directory=tmp_path / "keys" / "deploy")
    from edgesmith.toolchain.signing import load_deploy_key
    trust = tmp_path / "trust"
    for sub in ("build", "deploy"):
        (trust / sub).mkdir(parents=True)
    shutil.copy(digits_served["pub"], trust / "build" / "build.pub")  # the session's build key signs the loop's builds too
    (trust / "deploy" / "deploy.pub").write_text(load_deploy_key(deploy_key).public_key.hex() + "\n")
    for sub in ("build", "deploy"):
        os.chmod(trust / sub, 0o700)
    os.chmod(trust, 0o700)

    db = f"sqlite:///{tmp_path / 'monitor.db'}"
    monitor = MonitorProcess(broker.dir, db, tmp_path / "monitor.log").start()
    agents: list[Agent] = []
    env = {**os.environ, "EDGESMITH_HOME": str(session_home), "MLFLOW_TRACKING_URI": f"sqlite:///{registry}"}
    loop = [EDGESMITH, "loop", "--fleet", FLEET, "--on-alert", "drift", "--labels-from", str(oracle),
            "--config", str(config), "--broker", str(broker.dir), "--db", db, "--dir", str(tmp_path / "captures"),
            "--datasets", str(tmp_path / "datasets"), "--store", str(tmp_path / "artifacts"),
            "--key", str(deploy_key), "--max-samples", "100", "--capture-timeout", "120", "-o", str(tmp_path / "dist"),
            "--backend", "openvino", "--precision", "fp32",  # the default selection (every backend) is the demo's
            "--min-accuracy", "0", "--shadow-duration", "6", "--shadow-sample", "1", "--shadow-min-samples", "10",
            "--waves", "50%,100%", "--wave-timeout", "120", "--previous", str(digits_served["path"])]
    try:
        for device, replay in (("cam-ok", digits_served["digits"]), ("cam-rot", tmp_path / "rotated.npy")):
            agent = Agent(digits_served, broker.add_device(device), tmp_path / device, "--trust-dir", str(trust),
                          "--interval", "0.5", "--synthetic-load", "100", "--load-from", str(replay))
            agents.append(agent)
            agent.ready()
        wait_until(lambda: any(a["alert"] == "drift" and a["subject"].startswith("cam-rot/") and a["active"]
                               for a in monitor.api()["alerts"]), 60, "the drift alert of cam-rot")
        (request,) = json.loads(monitor.get("/api/retrain"))
        rid = request["id"]

        # 1. Killed once its label step is done (while it trains): the steps done stay done.
        first = subprocess.Popen(loop, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
        try:
            wait_until(lambda: first.poll() is not None or _steps(db, rid).get("label", {}).get("status") == "done",
                       300, "the loop's label step")
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            out, err = first.communicate(timeout=30)
        before = _steps(db, rid)
        assert [s for s, r in before.items() if r["status"] == "done"] == ["capture", "collect", "label"], (before, err)
        row = _request(db, rid)
        # (killed as the label step ended or once training began)
        assert row["status"] in ("capturing", "training") and row["capture_id"] == before["capture"]["detail"]["capture_id"]
        assert row["dataset_digest"] == before["label"]["detail"]["labelled"]
        assert before["collect"]["detail"]["samples"] >= 50 and before["label"]["detail"]["labelled_samples"] > 0

        # 2. Resumed with an impossible latency bound: train, build and validate run, the shadow's gate stops it.
        failed = subprocess.run(loop + ["--max-latency-ratio", "0.001"], env=env, capture_output=True, text=True,
                                timeout=500)
        assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
        (sentence,) = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
        # (on a loaded machine the candidate, at SCHED_IDLE, may run too few samples: the shadow's other gate)
        assert re.match(r"error: the shadow's latency gate was not met: on cam-rot .*\(bound 0\.001\)|"
                        r"error: the shadow gate was not met: shadow sh-\S+ has cam-rot \d+ samples \(needed 10 per",
                        sentence) and sentence.endswith("run `edgesmith loop` again"), sentence
        assert "Traceback" not in failed.stderr
        after = _steps(db, rid)
        for step in ("capture", "collect", "label"):  # not done again
            assert after[step] == before[step], step
        assert [s for s in ("train", "build", "validate") if after[s]["status"] == "done"] == ["train", "build", "validate"]
        assert after["shadow"]["status"] == "failed" and after["shadow"]["detail"]["error"] == sentence[len("error: "):]
        row = _request(db, rid)
        assert row["status"] == "shadowing" and row["note"] == "shadow failed: " + sentence[len("error: "):]
        assert (row["mlflow_run_id"], row["result_version"]) == (after["train"]["detail"]["run_id"],
                                                                after["train"]["detail"]["version"])

        # 3. Resumed with a bound this loaded machine meets: shadow and canary rollout, the request is done.
        done = subprocess.run(loop + ["--max-latency-ratio", "1000", "--shadow-min-samples", "1", "--shadow-duration",
                                      "20", "--json"], env=env, capture_output=True,
                              text=True, timeout=500)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        final = json.loads(done.stdout)
        assert final["status"] == "done" and final["result_version"] == after["train"]["detail"]["version"]
        for step in ("capture", "collect", "label", "train", "build", "validate"):
            assert final["steps"][step] == after[step], step
        assert final["steps"]["shadow"]["status"] == final["steps"]["rollout"]["status"] == "done"
        assert "done before, not run again" in done.stderr
        built = Path(final["steps"]["build"]["detail"]["artifact"])
        manifest_sha = hashlib.sha256((built / "manifest.json").read_bytes()).hexdigest()
        for device in ("cam-ok", "cam-rot"):  # the whole fleet serves the retrained model
            monitor.wait_device(device, lambda d: d["manifest_sha256"] == manifest_sha, "the retrained model", 120)
        # The new version's lineage names the alert and the captured dataset.
        import mlflow
        client = mlflow.MlflowClient(f"sqlite:///{registry}", registry_uri=f"sqlite:///{registry}")
        version = client.get_model_version("digits", final["result_version"])
        assert version.tags["edgesmith.extra_dataset_digest"] == final["dataset_digest"]
        assert version.tags["edgesmith.alert"].startswith(f"{FLEET}/drift/cam-rot/")
        again = subprocess.run(loop, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 1 and "has no active retrain request" in again.stderr, again.stderr
    finally:
        for agent in agents:
            agent.stop()
        monitor.stop()


def test_the_monitor_ignores_central_states_on_device_topics():
    """The loop publishes shadow and capture states (retained, on the device's topics): the monitor,
    which reads edgesmith/v1/#, ignores them like desired states instead of counting them as the
    device's refused messages; a kind nobody publishes is still refused."""
    from edgesmith.toolchain.fleet.monitor import classify

    for kind in ("desired", "shadow-desired", "capture-desired"):
        assert classify(f"edgesmith/v1/{FLEET}/cam-1/{kind}", b"{}", 0, retained=True) is None, kind
    assert classify(f"edgesmith/v1/{FLEET}/cam-1/bogus", b"{}", 0) is not None

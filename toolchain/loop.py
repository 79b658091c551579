"""``edgesmith loop``: from a drift alert to a retrained, re-validated model on the devices (docs/loop.md).

One retrain request (toolchain/fleet/store/retrain.py) is carried through the steps below, each
composed of what the other commands do (nothing here re-implements them):

    capture   capture start on the request's devices (drift policy, budget)        → capturing, capture_id
    collect   ask for uploads until the receiver holds the budget, then stop the capture
    label     capture pull (this capture only) → data label (the labelling source) → training, dataset_digest
    train     edgesmith train CONFIG --extra-data DATASET --alert ALERT --alias A   → building, mlflow_run_id,
                                                                                      result_version
    build     edgesmith build models:/NAME/VERSION -t <the devices' target> (default selection)
    validate  gate: top-1 accuracy of the built artifact on the captured samples training held out
    shadow    shadow start on the drifted devices, wait for it to end; gate: its latency ratio → shadowing
    rollout   canary deploy in waves over the fleet                                  → rolling-out → done

Every step is recorded on the request (``retrain.record_step``: done or failed, when, how long, what
it made), so running the loop again resumes at the first step not done. Top-1 agreement with the
serving model is not a gate: the new model is meant to disagree with it on the drifted inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.fleet.store import retrain

STEPS = ("capture", "collect", "label", "train", "build", "validate", "shadow", "rollout")
# The request's status while a step runs (advanced to on entering it, when it is not there already).
STATUS_OF = {"capture": "capturing", "collect": "capturing", "label": "capturing", "train": "training",
             "build": "building", "validate": "building", "shadow": "shadowing", "rollout": "rolling-out"}
Say = Callable[[str], None]


class GateFailed(UserError):
    """A step's gate was not met: one sentence naming the gate, the figures and what to do."""


@dataclass
class LoopConfig:
    fleet: str
    broker_dir: Path
    db_url: str
    config: Path  # the training config (TOML)
    labels: Path  # the labelling source: a CSV keyed by sample id or input digest
    request: str | None = None
    receiver: str | None = None  # a running `edgesmith capture serve`; None: one in this process
    listen: str = "127.0.0.1:0"
    capture_dir: Path | None = None
    datasets: Path | None = None
    store_dir: Path | None = None  # the artifact store
    key: Path | None = None
    tracking_uri: str | None = None
    policy: str = "drift:1.0"
    max_samples: int = 300
    capture_timeout_s: float = 300.0
    alias: str = "challenger"
    target: str | None = None
    backend: str | None = None  # None: the build's default selection
    precision: str | None = None
    output: Path = Path("dist/loop")
    min_accuracy: float = 0.9
    shadow_duration_s: int = 20
    shadow_sample: float = 0.5
    shadow_min_samples: int = 20
    max_latency_ratio: float = 3.0
    waves: str = "34%,100%"
    abort_on_failure: str = "34%"
    wave_timeout_s: float = 120.0
    previous: list[Path] = field(default_factory=list)
    serve: str = "127.0.0.1:0"
    base_url: str | None = None
    no_serve: bool = False


def pick_request(store, fleet: str, request_id: str | None) -> dict[str, Any]:
    """The given request, or the fleet's oldest active one."""
    if request_id:
        row = retrain.get(store, request_id)
        if row["fleet"] != fleet:
            raise UserError(f"retrain request {request_id} is of fleet {row['fleet']}, not {fleet}; pass --fleet {row['fleet']}")
        if row["status"] not in retrain.ACTIVE:
            raise UserError(f"retrain request {request_id} is {row['status']}; there is nothing left to do on it "
                            "(`edgesmith fleet retrain list` shows the active ones)")
        return row
    active = [r for r in retrain.requests(store, fleet, active_only=True)]
    if not active:
        raise UserError(f"fleet {fleet} has no active retrain request (a drift alert opens one); "
                        "`edgesmith fleet retrain list` shows them")
    return min(active, key=lambda r: (r["opened_ms"], r["id"]))


def _edgesmith() -> list[str]:
    script = Path(sys.executable).parent / "edgesmith"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from edgesmith.toolchain.cli import main; main()"]


def _run_json(args: list[str], what: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run an edgesmith command with --json; its progress goes to our stderr, its JSON is returned."""
    result = subprocess.run(args + ["--json"], stdout=subprocess.PIPE, stderr=None, text=True,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise UserError(f"the {what} step failed (`{' '.join(args[:3])} ...` exited {result.returncode}; its error "
                        "is above); fix that and run `edgesmith loop` again: it resumes at this step")
    return json.loads(result.stdout)


class Loop:
    def __init__(self, config: LoopConfig, say: Say):
        from edgesmith.toolchain.fleet.store import Store

        self.c = config
        self.say = say
        self.store = Store.open(config.db_url, create=False)
        self.request = pick_request(self.store, config.fleet, config.request)
        self.rid = self.request["id"]
        self.devices = list(self.request["devices"])

    # ---- bookkeeping -------------------------------------------------------------------------------

    def _enter(self, status: str) -> None:
        """Move the request forward to ``status``; never back (a step re-run after a kill keeps it where it is)."""
        current = retrain.get(self.store, self.rid)["status"]
        if retrain.STATUSES.index(current) < retrain.STATUSES.index(status):
            retrain.advance(self.store, self.rid, status)

    def _detail(self, step: str) -> dict[str, Any]:
        return retrain.steps(self.store, self.rid)[step]["detail"]

    def run(self) -> dict[str, Any]:
        done = {s for s, r in retrain.steps(self.store, self.rid).items() if r["status"] == "done"}
        self.say(f"retrain request {self.rid} of {self.c.fleet}: {self.request['model']} version "
                 f"{self.request['model_version']}, drifted devices {', '.join(self.devices)}; status "
                 f"{self.request['status']}" + (f", steps done: {', '.join(s for s in STEPS if s in done)}" if done else ""))
        with contextlib.ExitStack() as stack:
            self._stack = stack
            for step in STEPS:
                if step in done:
                    self.say(f"  {step}: done before, not run again")
                    continue
                self._enter(STATUS_OF[step])
                started = time.time()
                try:
                    detail = getattr(self, f"_step_{step}")()
                except UserError as e:
                    took = time.time() - started
                    retrain.record_step(self.store, self.rid, step, "failed", int(started * 1000), int(took * 1000),
                                        {"error": str(e)})
                    retrain.link(self.store, self.rid, note=f"{step} failed: {e}")
                    self.say(f"  {step}: FAILED after {took:.1f} s")
                    raise
                took = time.time() - started
                retrain.record_step(self.store, self.rid, step, "done", int(started * 1000), int(took * 1000), detail)
                self.say(f"  {step}: done in {took:.1f} s ({detail.get('said', '')})")
        row = retrain.advance(self.store, self.rid, "done", note="closed by edgesmith loop",
                              result_version=self._detail("train")["version"])
        timings = {s: r["duration_ms"] / 1000 for s, r in retrain.steps(self.store, self.rid).items()}
        trained = self._detail("train")
        self.say(f"retrain request {self.rid} is done: {trained['model']} version {row['result_version']} (as "
                 f"{Path(self._detail('build')['artifact']).name}) rolled out to {self.c.fleet}; "
                 "step times: " + ", ".join(f"{s} {timings[s]:.1f} s" for s in STEPS if s in timings))
        return row

    # ---- capture, collect, label -------------------------------------------------------------------

    def _capture_store(self):
        from edgesmith.toolchain.capture.store import CaptureStore, default_dir

        return CaptureStore(self.c.capture_dir or default_dir())

    def _receiver(self) -> str:
        if self.c.receiver:
            return self.c.receiver
        if getattr(self, "_receiver_url", None) is None:
            from edgesmith.toolchain.capture.receiver import CaptureReceiver
            from edgesmith.toolchain.deploy import archive as archive_mod
            from edgesmith.toolchain.fleet.monitor import parse_http

            host, port = parse_http(self.c.listen)
            receiver = CaptureReceiver(self._capture_store(), host, port,
                                       artifacts=self.c.store_dir or archive_mod.default_store_dir())
            self._stack.enter_context(receiver)
            self._receiver_url = receiver.url
        return self._receiver_url

    def _capture_command(self):
        from edgesmith.toolchain.capture.command import CaptureCommand
        from edgesmith.toolchain.signing import load_deploy_key

        return CaptureCommand(fleet=self.c.fleet, broker_dir=self.c.broker_dir, key=load_deploy_key(self.c.key),
                              devices=self.devices)

    def _step_capture(self) -> dict[str, Any]:
        from edgesmith.runtime.contract import CaptureAction
        from edgesmith.toolchain.capture import command

        rules = command.parse_policy(self.c.policy)
        capture_id, versions = command.publish(
            self._capture_command(), CaptureAction.START, self._capture_store(), receiver=self._receiver(),
            policy=rules, drifted=set(self.devices) if rules.get("drift") else None, max_samples=self.c.max_samples,
            max_bytes=64 << 20, retention_s=24 * 3600)
        retrain.link(self.store, self.rid, capture_id=capture_id)
        return {"capture_id": capture_id, "devices": sorted(versions), "said": f"capture {capture_id} started on "
                f"{', '.join(sorted(versions))}, policy {self.c.policy}, at most {self.c.max_samples} samples each"}

    def _received(self, store, capture_id: str) -> int:
        return sum(1 for r in store.samples(self.c.fleet) if r["capture_id"] == capture_id)

    def _step_collect(self) -> dict[str, Any]:
        from edgesmith.runtime.contract import CaptureAction
        from edgesmith.toolchain.capture import command

        capture_id = retrain.get(self.store, self.rid)["capture_id"]
        store = self._capture_store()
        wanted = self.c.max_samples * len(self.devices)
        deadline = time.monotonic() + self.c.capture_timeout_s
        received, asked = 0, 0.0
        while True:
            received = self._received(store, capture_id)
            if received >= wanted or time.monotonic() > deadline:
                break
            if time.monotonic() - asked >= 2:  # each upload round takes what is stored by then
                command.publish(self._capture_command(), CaptureAction.UPLOAD, store, receiver=self._receiver(),
                                capture_id=capture_id)
                asked = time.monotonic()
            time.sleep(1)
        if received < max(1, wanted // 2):  # the capture goes on: a re-run collects more of the same capture
            raise GateFailed(f"the capture gate was not met: the receiver got {received} of {wanted} samples of "
                             f"capture {capture_id} within {self.c.capture_timeout_s:g} s; check that the devices "
                             f"{', '.join(self.devices)} still drift and reach the receiver, or give --capture-timeout "
                             "more time, then run `edgesmith loop` again")
        command.publish(self._capture_command(), CaptureAction.STOP, store, receiver=self._receiver(),
                        capture_id=capture_id)
        return {"capture_id": capture_id, "samples": received, "said": f"{received} samples received"}

    def _step_label(self) -> dict[str, Any]:
        from edgesmith.toolchain.data import datasets as ds

        capture_id = retrain.get(self.store, self.rid)["capture_id"]
        pulled = ds.pull(self._capture_store(), self.c.fleet, root=self.c.datasets, captures={capture_id})
        pull_run = ds.log_to_mlflow(pulled, self.c.tracking_uri)
        labelled = ds.label(pulled, self.c.labels, skip_unknown=True)
        label_run = ds.log_to_mlflow(labelled, self.c.tracking_uri)
        retrain.link(self.store, self.rid, dataset_digest=labelled.digest)
        return {"captured": pulled.digest, "labelled": labelled.digest, "samples": pulled.meta["samples"],
                "labelled_samples": labelled.meta["samples"], "mlflow_runs": [pull_run, label_run],
                "said": f"dataset {pulled.digest[:12]} ({pulled.meta['samples']} samples), labelled "
                        f"{labelled.digest[:12]} ({labelled.meta['samples']} samples)"}

    # ---- train, build, validate --------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {}
        if self.c.tracking_uri:
            env["MLFLOW_TRACKING_URI"] = self.c.tracking_uri
        if self.c.datasets:
            env["EDGESMITH_DATASETS"] = str(self.c.datasets)
        return env

    def _step_train(self) -> dict[str, Any]:
        request = retrain.get(self.store, self.rid)
        alert = request["alerts"][0]["alert"] if request["alerts"] else None
        args = [sys.executable, "-m", "edgesmith.toolchain.train", str(self.c.config), "--extra-data",
                request["dataset_digest"], "--alias", self.c.alias] + (["--alert", alert] if alert else [])
        summary = _run_json(args, "train", self._env())
        retrain.link(self.store, self.rid, mlflow_run_id=summary["run_id"], result_version=summary["version"])
        return {"model": summary["model_name"], "version": summary["version"], "run_id": summary["run_id"],
                "test_accuracy": summary["test_accuracy"],
                "said": f"{summary['model_name']} version {summary['version']}, test accuracy "
                        f"{summary['test_accuracy']:.2%} (run {summary['run_id']})"}

    def _target(self) -> str:
        if self.c.target:
            return self.c.target
        targets = {d["target"] for d in self.store.devices() if d.get("fleet") == self.c.fleet
                   and d["device"] in self.devices and d.get("target")}
        if len(targets) != 1:
            raise UserError(f"the drifted devices {', '.join(self.devices)} report "
                            + (f"targets {', '.join(sorted(targets))}" if targets else "no target")
                            + "; pass --target NAME")
        return targets.pop()

    def _step_build(self) -> dict[str, Any]:
        trained = self._detail("train")
        target = self._target()
        name = f"{trained['model']}-v{trained['version']}"
        out = _run_json(_edgesmith() + ["build", f"models:/{trained['model']}/{trained['version']}", "-t", target,
                                        "--name", name, "-o", str(self.c.output)]
                       + (["--backend", self.c.backend] if self.c.backend else [])
                       + (["--precision", self.c.precision] if self.c.precision else []), "build", self._env())
        chosen = next((s for s in out["selections"] if s["target"] == target), None)
        artifacts = [a for a in out["artifacts"] if a["target"] == target]
        if chosen is not None:
            picked = [a for a in artifacts if a["backend"] == chosen["chosen"]
                      and a["precision"] == chosen.get("chosen_precision", a["precision"])] or artifacts
        else:
            picked = artifacts
        if not picked:
            raise UserError(f"the build of {name} for {target} made no artifact; see its notes above")
        artifact = picked[0]
        return {"artifact": artifact["path"], "target": target, "backend": artifact["backend"],
                "precision": artifact["precision"], "said": f"{Path(artifact['path']).name} ({artifact['backend']}, "
                f"{artifact['precision']}) for {target}"}

    def _held_out(self) -> tuple[np.ndarray, np.ndarray]:
        """The labelled captured samples training held out (its test share, by the config's seed),
        without those whose input also went into training (a replayed input can be captured twice)."""
        from edgesmith.toolchain.train.config import load_config
        from edgesmith.toolchain.train.data import extra_parts, load_extra

        from edgesmith.toolchain.data.datasets import input_digests, open_dataset

        cfg = load_config(self.c.config)
        digest = retrain.get(self.store, self.rid)["dataset_digest"]
        dataset = open_dataset(digest, self.c.datasets)
        extra = load_extra(digest, cfg, [str(i) for i in range(dataset.meta["classes"] or 1)], self.c.datasets)
        train_part, val_part, test_part = extra_parts(extra, cfg)
        digests = np.array(input_digests(dataset))
        seen = set(digests[train_part]) | set(digests[val_part])
        keep = np.array([i for i in test_part if digests[i] not in seen], dtype=np.int64)
        return extra.x[keep], extra.y[keep]

    def _step_validate(self) -> dict[str, Any]:
        x, y = self._held_out()
        if len(y) == 0:
            raise GateFailed("the held-out accuracy gate has nothing to measure: every captured input went into "
                             "training; capture more (a larger --max-samples) and run `edgesmith loop` again")
        built = self._detail("build")["artifact"]
        accuracy = top1(built, x, y)
        serving = None  # the serving model on the same samples, when it is among --previous: a figure, not a gate
        for directory in self.c.previous:
            from edgesmith.toolchain.deploy import archive as archive_mod

            if archive_mod.read_manifest(directory)[1] == self.request.get("manifest_sha256"):
                serving = top1(directory, x, y)
        said = (f"top-1 {accuracy:.2%} on {len(y)} held-out captured samples"
                + (f" (the serving model: {serving:.2%})" if serving is not None else ""))
        if accuracy < self.c.min_accuracy:
            raise GateFailed(f"the held-out accuracy gate was not met: {Path(built).name} scored {accuracy:.2%} top-1 on "
                             f"{len(y)} labelled captured samples training did not see, below --min-accuracy "
                             f"{self.c.min_accuracy:.0%}; capture and label more of the drifted inputs (--max-samples) "
                             "or train longer, then run `edgesmith loop` again")
        return {"accuracy": accuracy, "samples": int(len(y)), "serving_accuracy": serving, "said": said}

    # ---- shadow, rollout ---------------------------------------------------------------------------

    def _served_url(self) -> str:
        if getattr(self, "_artifact_url", None) is None:
            from edgesmith.toolchain.cli.deploy import _serving
            from edgesmith.toolchain.deploy import archive as archive_mod

            self._artifact_url = self._stack.enter_context(
                _serving(self.c.store_dir or archive_mod.default_store_dir(), self.c.serve, self.c.base_url,
                         self.c.no_serve))
        return self._artifact_url

    def _step_shadow(self) -> dict[str, Any]:
        from edgesmith.toolchain.cli.artifacts import trusted_keys
        from edgesmith.toolchain.deploy import archive as archive_mod
        from edgesmith.toolchain.shadow import central, results
        from edgesmith.toolchain.signing import load_deploy_key

        artifact = Path(self._detail("build")["artifact"])
        config = central.ShadowConfig(fleet=self.c.fleet, broker_dir=self.c.broker_dir, key=load_deploy_key(self.c.key),
                                      base_url=self._served_url(),
                                      store_dir=self.c.store_dir or archive_mod.default_store_dir(),
                                      duration_s=self.c.shadow_duration_s, sample=self.c.shadow_sample,
                                      devices=self.devices, wait_s=60.0)
        shadow_id = central.start([artifact], config, self.store, lambda line: self.say(f"    {line}"),
                                  trusted_keys(None), self.c.previous)
        while True:  # the shadow ends on the devices at ends_ms; its last windows arrive shortly after
            data = results.report(self.store, shadow_id)
            if data["status"] != "running":
                break
            time.sleep(1)
        time.sleep(3)
        data = results.report(self.store, shadow_id)
        figures = data["figures"]
        said = "; ".join(f"{f['device']}: {f['samples']} samples, latency ratio "
                         + ("n/a" if f["latency_ratio"] is None else f"{f['latency_ratio']:.2f}")
                         + ("" if f["agreement"] is None else f", agreement {f['agreement']:.2f} (not a gate)")
                         for f in figures)
        short = [f for f in figures if f["samples"] < self.c.shadow_min_samples]
        missing = sorted(set(self.devices) - {f["device"] for f in figures})
        if missing or short:
            raise GateFailed(f"the shadow gate was not met: shadow {shadow_id} has "
                             + (f"no figures from {', '.join(missing)}" if missing else
                                ", ".join(f"{f['device']} {f['samples']} samples" for f in short))
                             + f" (needed {self.c.shadow_min_samples} per device); give a longer --shadow-duration or a "
                             "larger --shadow-sample and run `edgesmith loop` again")
        slow = [f for f in figures if f["latency_ratio"] is None or f["latency_ratio"] > self.c.max_latency_ratio]
        if slow:
            raise GateFailed(f"the shadow's latency gate was not met: on {', '.join(f['device'] for f in slow)} "
                             f"{artifact.name} ran at latency ratio "
                             + ", ".join("unknown" if f["latency_ratio"] is None else f"{f['latency_ratio']:.2f}"
                                         for f in slow)
                             + f" of the serving model (bound {self.c.max_latency_ratio:g}); build for a faster backend "
                             "or precision, or raise --max-latency-ratio if that latency is acceptable, then run "
                             "`edgesmith loop` again")
        return {"shadow_id": shadow_id, "figures": figures, "said": f"shadow {shadow_id}: {said}"}

    def _step_rollout(self) -> dict[str, Any]:
        from edgesmith.toolchain.cli.deploy import _config
        from edgesmith.toolchain.deploy import archive as archive_mod
        from edgesmith.toolchain.deploy.rollout import deploy

        store_dir = self.c.store_dir or archive_mod.default_store_dir()
        artifact = Path(self._detail("build")["artifact"])
        config = _config(self.c.fleet, self.c.broker_dir, self.c.waves, self.c.abort_on_failure, self.c.wave_timeout_s,
                         self.c.key, store_dir, "", None)
        info = archive_mod.archive(artifact, store_dir)
        for directory in self.c.previous:
            archive_mod.archive(directory, store_dir)
        config.base_url = self._served_url()
        result = deploy(info, config, self.store, lambda line: self.say(f"    {line}"))
        if result.status != "completed":
            raise GateFailed(f"the canary rollout gate was not met: deployment {result.deployment_id} {result.status} "
                             f"({result.applied} applied, {result.failed} failed of {result.targeted}); see the "
                             "devices' reports above (`edgesmith fleet status`), fix them and run `edgesmith loop` again")
        return {"deployment_id": result.deployment_id, "applied": result.applied, "targeted": result.targeted,
                "said": f"deployment {result.deployment_id}: {result.applied} of {result.targeted} device(s) applied"
                        + (f", {result.skipped} already served it" if result.skipped else "")}


def top1(artifact: str | Path | None, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an artifact (verified and run by the runtime, as a device would) on ``x``."""
    from edgesmith.runtime import Session

    if artifact is None:
        raise ValueError("no artifact")
    session = Session(str(artifact))
    hits = 0
    for n in range(len(y)):
        outputs = session.run([np.ascontiguousarray(x[n:n + 1], dtype=np.float32)])
        hits += int(np.argmax(outputs[0]) == y[n])
    return hits / len(y)

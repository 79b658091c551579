"""Best-backend selection (`edgesmith build --backend auto`, the default; docs/selection.md): every
candidate built and validated, the native ones timed through Session, one artifact published, and
every candidate's outcome recorded in the manifest's `selection`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DIGITS, build_json, run_cli

from edgesmith.runtime.manifest import Manifest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def auto_build(tmp_path_factory) -> dict:
    """The digits CNN built for the host with the default backend choice."""
    root = tmp_path_factory.mktemp("selection")
    home, out = root / "home", root / "dist"
    result = build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "host", "-o", str(out), env={"EDGESMITH_HOME": str(home)})
    return {"result": result, "out": out, "home": home, "artifacts": result["artifacts"],
            "selections": {s["target"]: s for s in result["selections"]}}


def _manifest(path: str | Path) -> Manifest:
    return Manifest.from_bytes((Path(path) / "manifest.json").read_bytes())


def test_host_auto_keeps_the_fastest_candidate_and_records_all(auto_build):
    from edgesmith.toolchain.targets import host_target

    host = host_target()
    (art,) = auto_build["artifacts"]
    assert art["target"] == host.name
    m = _manifest(art["path"])
    sel = m.selection
    assert sel is not None and sel.mode == "auto" and sel.chosen == art["backend"] == m.backend.name
    assert [c.backend for c in sel.candidates] == list(host.backends)
    for c in sel.candidates:  # all of them run natively here, in the C++ runtime
        assert c.status == "passed" and c.error is None
        assert c.latency_us_p50 > 0 and c.latency_us_p95 >= c.latency_us_p50
        assert c.timed_how.startswith(f"native Session, {host.threads} threads, best of ")
    fastest = min(sel.candidates, key=lambda c: c.latency_us_p50)
    assert sel.chosen == fastest.backend and "fastest p50 here" in sel.reason and sel.rule
    assert m.build.latency_us == fastest.latency_us_p50 == art["latency_us"]
    assert auto_build["selections"][host.name]["chosen"] == sel.chosen
    # the published artifact verifies with the real key and runs
    run_cli("verify", art["path"], env={"EDGESMITH_HOME": str(auto_build["home"])})


def test_only_the_chosen_artifact_is_published(auto_build):
    (art,) = auto_build["artifacts"]
    # hidden staging directories would show up here too
    assert [p.name for p in auto_build["out"].iterdir()] == [Path(art["path"]).name]
    assert not auto_build["result"]["failures"] and not auto_build["result"]["notes"]


def test_non_native_target_is_ranked_by_the_rule(digits_artifacts):
    """rpi4-aarch64 (built with --backend all by the shared fixture: every candidate published, each
    manifest recording the choice auto makes) cannot be timed here: the rule ranks it."""
    arts = {b: a for (t, b), a in digits_artifacts["artifacts"].items() if t == "rpi4-aarch64"}
    assert sorted(arts) == ["openvino", "ort", "tflite", "tvm"]
    for backend, art in arts.items():
        m = _manifest(art["path"])
        sel = m.selection
        assert sel.mode == "all" and m.backend.name == backend
        # rpi4 lists tvm first; untuned TVM is never the default when another candidate passes
        assert [c.backend for c in sel.candidates] == ["tvm", "openvino", "ort", "tflite"]
        assert all(c.status == "passed" and c.latency_us_p50 is None and c.timed_how is None for c in sel.candidates)
        assert sel.chosen == "openvino" and "not timed here" in sel.reason and "untuned" in sel.reason
        assert m.build.latency_us is None
        assert '"latency_us": null' in (Path(art["path"]) / "manifest.json").read_text()  # stated, not left out


def test_backend_all_times_every_native_candidate(digits_artifacts):
    arts = {b: a for (t, b), a in digits_artifacts["artifacts"].items() if t == "x86_64-avx2"}
    sels = [_manifest(a["path"]).selection for a in arts.values()]
    assert len(arts) == 4 and all(s == sels[0] for s in sels)  # one choice, recorded in every artifact
    for backend, art in arts.items():
        (record,) = [c for c in sels[0].candidates if c.backend == backend]
        assert record.latency_us_p50 > 0 and art["latency_us"] == record.latency_us_p50
    assert sels[0].chosen == min(sels[0].candidates, key=lambda c: c.latency_us_p50).backend


def test_a_tuned_tvm_wins_off_host_only_by_recorded_latency(auto_build):
    """The ranking rule on real staged manifests, with a TVM tuning record as the tuning work writes it."""
    from edgesmith.toolchain.build import Candidate, StagedArtifact, select
    from edgesmith.toolchain.signing import ephemeral_key
    from edgesmith.toolchain.targets import get_target

    target = get_target("rpi4-aarch64")
    base = _manifest(auto_build["artifacts"][0]["path"])  # any real manifest: the rule reads backend.options only

    def candidate(backend: str, tuning: dict | None = None) -> Candidate:
        m = base.model_copy(deep=True)
        m.backend.name = backend
        m.backend.options = {"tuning": tuning} if tuning else {}
        staged = StagedArtifact(target=target, backend=backend, path=Path("."), final=Path("."), manifest=m,
                                staging_key=ephemeral_key(), device_runtime=True, duration_s=0.0, stages={})
        return Candidate(backend, "passed", staged=staged)

    tuned = {"sha256": "0" * 64, "workloads_matched": 5, "workloads_total": 5, "latency_us": 900.0,
             "measured_on": "rpi4-aarch64"}
    # the others record no latency on the device: a tuned TVM cannot show it beats them, so it ranks after them
    chosen = select(target, [candidate("tvm", tuned), candidate("openvino"), candidate("ort")])
    assert chosen.backend == "openvino" and "does not beat" in chosen.reason
    # on a device through RPC counts as this target's device class too
    from edgesmith.toolchain.selection import recorded_latency_us

    assert recorded_latency_us(candidate("tvm", {**tuned, "measured_on": "rpc:rpi4"}).staged) == 900.0
    # measured on another device class, nothing matched, or no latency: untuned
    for other in ({**tuned, "measured_on": "rpi5-aarch64"}, {**tuned, "workloads_matched": 0},
                  {**tuned, "latency_us": None}):
        chosen = select(target, [candidate("tvm", other), candidate("ort")])
        assert chosen.backend == "ort" and "untuned" in chosen.reason
    # a failed candidate never wins; a lone TVM build that passed does
    failed = Candidate("openvino", "failed", error="x")
    assert select(target, [candidate("tvm"), failed]).backend == "tvm"
    assert select(target, [failed]) is None


def test_a_failing_candidate_is_recorded_while_another_wins(tmp_path):
    from test_build import _conv_model

    targets = tmp_path / "targets"
    targets.mkdir()
    common = 'extends = "_linux-x86_64"\ndescription = "x"\nthreads = 2\ncpu_features = ["avx2", "fma"]\n'
    (targets / "x86-tvm-ort.toml").write_text(common + 'backends = ["tvm", "ort"]\n')
    (targets / "x86-tvm-only.toml").write_text(common + 'backends = ["tvm"]\n')
    model = _conv_model(tmp_path, "convcelu", "Celu")  # TVM's ONNX frontend has no Celu
    out = tmp_path / "dist"
    env = {"EDGESMITH_TARGETS_PATH": str(targets), "EDGESMITH_HOME": str(tmp_path / "home")}
    result = run_cli("build", str(model), "-t", "x86-tvm-ort", "-t", "x86-tvm-only", "-o", str(out), "--json",
                     env=env, check=False)
    assert result.returncode == 1  # x86-tvm-only has no candidate that passes
    report = json.loads(result.stdout)
    (art,) = report["artifacts"]
    assert art["backend"] == "ort" and art["target"] == "x86-tvm-ort"
    (note,) = report["notes"]  # x86-tvm-ort's failing candidate is a note, not a failure
    assert note["target"] == "x86-tvm-ort" and note["backend"] == "tvm" and note["status"] == "failed"
    assert "Celu" in note["error"] and "note: x86-tvm-ort/tvm failed" in result.stderr
    sel = _manifest(art["path"]).selection
    tvm, ort = sel.candidates
    assert tvm.status == "failed" and "Celu" in tvm.error and tvm.latency_us_p50 is None
    assert ort.status == "passed" and ort.latency_us_p50 > 0 and sel.chosen == "ort"
    # no candidate passes: a failure with every candidate's error, and nothing written
    (failure,) = report["failures"]
    assert failure["target"] == "x86-tvm-only" and failure["backend"] == "tvm" and "Celu" in failure["error"]
    assert {s["target"]: s["chosen"] for s in report["selections"]} == {"x86-tvm-ort": "ort", "x86-tvm-only": None}
    assert sorted(p.name for p in out.iterdir()) == ["convcelu-x86-tvm-ort-ort"]


def test_forced_backend_measures_latency_without_a_selection(digits_host_openvino):
    text = (digits_host_openvino["path"] / "manifest.json").read_text()
    assert '"selection"' not in text
    m = _manifest(digits_host_openvino["path"])
    assert m.backend.name == "openvino" and m.build.latency_us is not None and m.build.latency_us > 0


def test_tracking_uri_names_the_store_models_are_read_from(tmp_path):
    store = f"sqlite:///{tmp_path / 'empty.db'}"
    result = run_cli("build", "models:/digits@champion", "--tracking-uri", store, "-o", str(tmp_path / "dist"),
                     env={"EDGESMITH_HOME": str(tmp_path / "home")}, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"no registered model 'digits' in {store}" in " ".join(result.stderr.split())


def test_auto_publishes_the_next_best_when_the_chosen_fails_late(tmp_path, monkeypatch):
    """A failure after the choice (signing, publishing, the serving-latency run) costs the build its
    best candidate, not the build: the rule's next pick is published, the failure is a note."""
    from typer.testing import CliRunner

    from edgesmith.toolchain import build as build_mod
    from edgesmith.toolchain.cli import app

    real, failed = build_mod.finish, []

    def finish_fails_first(source, staged, *args, **kwargs):
        if not failed:
            failed.append(staged.backend)
            raise OSError(28, "No space left on device")
        return real(source, staged, *args, **kwargs)

    monkeypatch.setattr(build_mod, "finish", finish_fails_first)
    result = CliRunner().invoke(app, ["build", DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2",
                                      "-o", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    (artifact,) = report["artifacts"]
    assert artifact["backend"] != failed[0] and report["failures"] == []
    manifest = _manifest(artifact["path"])
    first = next(c for c in manifest.selection.candidates if c.backend == failed[0])
    assert first.status == "failed" and "No space left on device" in first.error
    assert manifest.selection.chosen == artifact["backend"]
    assert [p.name for p in tmp_path.iterdir()] == [f"digits-cnn-x86_64-avx2-{artifact['backend']}"]


def test_a_reduced_precision_must_win_by_the_margin():
    """int8 18.9 µs against fp32 19.3 µs is a tie on shared cores, and a reduced precision costs
    accuracy: fp32 is kept. 15 µs against 19.3 is a win."""
    from types import SimpleNamespace

    from edgesmith.toolchain.selection import REDUCED_MARGIN, Candidate, Timing, select
    from edgesmith.toolchain.targets import get_target

    target = get_target("x86_64-avx2")
    staged = SimpleNamespace(target=target, device_runtime=True)
    fp32 = Candidate("ort", "passed", staged=staged, timing=Timing(19.3, 30.0, "blocks"))
    int8 = Candidate("ort", "passed", staged=staged, timing=Timing(18.9, 30.0, "blocks"), precision="int8")
    assert REDUCED_MARGIN == 0.05
    chosen = select(target, [fp32, int8])
    assert chosen is fp32 and "ort int8 is faster by less than the 5%" in chosen.reason
    int8.timing = Timing(15.0, 30.0, "blocks")
    chosen = select(target, [fp32, int8])
    assert chosen is int8 and chosen.reason.startswith("fastest p50 here: ort int8 15.0 µs")

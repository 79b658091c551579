"""Keys, publishing, multi-target builds, the backend registry and CPU features: what a user sees
when something is off (issue 6's "bad input" list)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import DIGITS, build_json, run_cli

EDGESMITH_RUN = str(Path(sys.executable).parent / "edgesmith-run")


# --- keys ------------------------------------------------------------------------------------------


def test_generated_key_is_private_from_the_start_and_never_clobbered(tmp_path):
    from edgesmith.toolchain.signing import generate_key, load_signing_key

    path = generate_key("team", tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (tmp_path / "team.pub").read_text().strip() == load_signing_key(path).public_key.hex()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["team.key", "team.pub"]  # no temporaries left
    before = path.read_bytes()
    again = run_cli("keys", "generate", "--name", "team", "--dir", str(tmp_path), check=False)
    assert again.returncode == 1 and "already exists" in again.stderr and path.read_bytes() == before


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "team.key", "", "x" * 65, "sp ace"])
def test_bad_key_names_are_refused(tmp_path, name):
    result = run_cli("keys", "generate", "--name", name, "--dir", str(tmp_path), check=False)
    assert result.returncode == 1 and "key name" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_private_key_readable_by_others_is_refused_with_the_fix(tmp_path):
    run_cli("keys", "generate", "--name", "team", "--dir", str(tmp_path))
    key = tmp_path / "team.key"
    key.chmod(0o644)
    result = run_cli("build", DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "--backend", "openvino",
                     "--key", str(key), "-o", str(tmp_path / "dist"), check=False)
    assert result.returncode == 1 and f"chmod 600 {key}" in result.stderr
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_interrupted_generation_gets_its_public_key_back(tmp_path):
    from edgesmith.toolchain.signing import generate_key, load_signing_key

    path = generate_key("team", tmp_path)
    pub = (tmp_path / "team.pub").read_text()
    (tmp_path / "team.pub").unlink()  # as if killed between the two renames
    load_signing_key(path)
    assert (tmp_path / "team.pub").read_text() == pub


# --- publishing ------------------------------------------------------------------------------------


def _staged_copy(src: Path, parent: Path, version: str) -> Path:
    staging = parent / f".staging-{version}"
    shutil.copytree(src, staging)
    (staging / "marker").write_text(version)
    return staging


def test_readers_never_see_a_missing_or_mixed_artifact_during_publish(digits_artifacts, tmp_path):
    from edgesmith.toolchain.package import publish

    src = Path(digits_artifacts["artifacts"][("x86_64-avx2", "openvino")]["path"])
    final = tmp_path / src.name
    publish(_staged_copy(src, tmp_path, "v0"), final)
    seen, problems, stop = set(), [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.add((final / "marker").read_text())
                if not (final / "manifest.json").is_file():
                    problems.append("manifest.json missing")
            except OSError as e:
                problems.append(repr(e))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for k in range(1, 30):
            publish(_staged_copy(src, tmp_path, f"v{k}"), final)
    finally:
        stop.set()
        thread.join()
    assert problems == [] and len(seen) > 1
    assert (final / "marker").read_text() == "v29"
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]  # old versions removed


def test_failed_publish_keeps_the_old_artifact_whole(digits_artifacts, tmp_path, monkeypatch):
    from edgesmith.runtime import artifact
    from edgesmith.runtime.keys import load_public_key
    from edgesmith.toolchain import package

    src = Path(digits_artifacts["artifacts"][("x86_64-avx2", "openvino")]["path"])
    final = tmp_path / src.name
    package.publish(_staged_copy(src, tmp_path, "old"), final)

    def broken_exchange(a, b):
        raise OSError(28, "No space left on device", str(b))

    monkeypatch.setattr(package, "_exchange", broken_exchange)
    with pytest.raises(OSError):
        package.publish(_staged_copy(src, tmp_path, "new"), final)
    assert (final / "marker").read_text() == "old"
    (final / "marker").unlink()  # the old artifact is exactly what it was: it still verifies
    artifact.verify(final, [load_public_key(digits_artifacts["pub"])])


# --- builds ----------------------------------------------------------------------------------------


def test_one_failing_pair_of_any_kind_does_not_stop_the_others(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from edgesmith.toolchain import build as build_mod
    from edgesmith.toolchain.cli import app

    real = build_mod.stage_one

    def flaky(source, ref, target, backend, *args, **kwargs):
        if backend == "tvm":
            raise ZeroDivisionError("a bug in a backend")
        return real(source, ref, target, backend, *args, **kwargs)

    monkeypatch.setattr(build_mod, "stage_one", flaky)
    result = CliRunner().invoke(app, ["build", DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2",
                                      "--backend", "all", "-o", str(tmp_path), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert [a["backend"] for a in report["artifacts"]] == ["openvino", "ort", "tflite"]
    (failure,) = report["failures"]
    assert failure["backend"] == "tvm" and "internal error" in failure["error"] and "ZeroDivisionError" in failure["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits-cnn-x86_64-avx2-openvino", "digits-cnn-x86_64-avx2-ort",
                                                          "digits-cnn-x86_64-avx2-tflite"]


def test_artifact_is_signed_once_with_the_real_key(tmp_path):
    from edgesmith.toolchain.signing import generate_key, load_signing_key

    key = load_signing_key(generate_key("team", tmp_path / "keys"))
    built = build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "--backend", "tvm",
                       "--key", str(key.path), "-o", str(tmp_path / "dist"))
    art = Path(built["artifacts"][0]["path"])
    signature = json.loads((art / "manifest.sig").read_text())
    assert signature["key_id"] == key.key_id
    manifest = json.loads((art / "manifest.json").read_text())
    # What was signed is the validated, proven manifest.
    assert manifest["validation"]["status"] == "passed" and manifest["proof"]["status"] == "proven"


def test_unknown_backend_in_a_target_file_names_the_registered_ones(tmp_path):
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "npu-board.toml").write_text('extends = "_linux-aarch64"\ndescription = "x"\nthreads = 2\n'
                                           'backends = ["tvm", "hexagon"]\n')
    result = run_cli("build", DIGITS, "--input-shape", "1,1,8,8", "-t", "npu-board", "-o", str(tmp_path / "d"),
                     env={"EDGESMITH_TARGETS_PATH": str(targets)}, check=False)
    assert result.returncode == 1
    assert "npu-board.toml" in result.stderr and "'hexagon' is not registered" in result.stderr
    assert "tvm, openvino, tflite" in result.stderr


# --- CPU features ----------------------------------------------------------------------------------


def _lacking_features() -> list[str]:
    from edgesmith.runtime import _core

    candidates = (["avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vp2intersect", "fma4", "xop"]
                  if _core.host_isa() == "x86_64" else ["sve2", "mte", "sve", "i8mm"])
    lacking = _core.cpu_features_missing(candidates)
    assert lacking, f"this CPU has every one of {candidates}; extend the list"
    return lacking


def test_artifact_for_a_cpu_with_more_features_is_refused_in_one_line(tmp_path):
    from edgesmith.runtime import Session
    from edgesmith.runtime.errors import UnsupportedArtifactError
    from edgesmith.runtime.keys import load_public_key

    lacking = _lacking_features()
    targets = tmp_path / "targets"
    targets.mkdir()
    features = ", ".join(f'"{f}"' for f in ["avx2", "fma", *lacking])
    (targets / "x86_64-future.toml").write_text(
        f'extends = "_linux-x86_64"\ndescription = "a CPU with more than this one"\nthreads = 2\n'
        f'cpu_features = [{features}]\n[tvm.target]\nmcpu = "haswell"\n')
    env = {"EDGESMITH_TARGETS_PATH": str(targets)}
    built = build_json(DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-future", "--backend", "openvino",
                       "-o", str(tmp_path / "dist"), env=env)
    art = built["artifacts"][0]
    assert art["validation"]["executed"]["how"] == "host-engine"  # the IR was checked, not run natively
    assert art["proof"]["status"] == "not-run" and ", ".join(lacking) in art["proof"]["reason"]

    home = Path(os.environ["EDGESMITH_HOME"])
    run = subprocess.run([EDGESMITH_RUN, art["path"], "--golden"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1, run.stderr
    assert f"needs CPU features this CPU lacks: {', '.join(lacking)}" in lines[0]
    with pytest.raises(UnsupportedArtifactError, match="needs CPU features this CPU lacks"):
        Session(art["path"], trusted_keys=[load_public_key(home / "keys" / "default.pub")])

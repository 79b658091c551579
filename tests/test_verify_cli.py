"""`edgesmith verify` / `inspect` / `keys` on real built artifacts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import DIGITS, run_cli

pytestmark = pytest.mark.integration


@pytest.fixture()
def artifact(digits_artifacts, tmp_path) -> Path:
    src = Path(digits_artifacts["artifacts"][("x86_64-avx2", "tvm")]["path"])
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_intact_artifact_verifies_with_known_and_given_key(artifact, digits_artifacts):
    ok = run_cli("verify", str(artifact), "--key", str(digits_artifacts["pub"]))
    assert ok.stdout.startswith("ok:")
    # Without --key: the builder's own $EDGESMITH_HOME/keys/*.pub are trusted.
    run_cli("verify", str(artifact), env={"EDGESMITH_HOME": str(digits_artifacts["home"])})


def test_every_single_byte_flip_is_caught_and_named(artifact, digits_artifacts):
    files = sorted(p for p in artifact.rglob("*") if p.is_file())
    assert {"manifest.json", "manifest.sig", "model.so"} <= {p.name for p in files}
    for path in files:
        original = path.read_bytes()
        for offset in sorted({0, len(original) // 2, len(original) - 1}):
            tampered = bytearray(original)
            tampered[offset] ^= 0x01
            path.write_bytes(bytes(tampered))
            result = run_cli("verify", str(artifact), "--key", str(digits_artifacts["pub"]), check=False)
            rel = path.relative_to(artifact).as_posix()
            assert result.returncode != 0, f"flip at {rel}:{offset} not detected"
            assert rel in result.stderr, f"flip at {rel}:{offset}: message does not name the file: {result.stderr}"
            assert "Traceback" not in result.stderr
        path.write_bytes(original)
    run_cli("verify", str(artifact), "--key", str(digits_artifacts["pub"]))


def test_other_key_is_refused(artifact, tmp_path):
    run_cli("keys", "generate", "--name", "other", "--dir", str(tmp_path / "k"))
    result = run_cli("verify", str(artifact), "--key", str(tmp_path / "k" / "other.pub"), check=False)
    assert result.returncode != 0 and "manifest.sig" in result.stderr


def test_no_trusted_keys_is_a_clear_error(artifact):
    result = run_cli("verify", str(artifact), check=False)
    assert result.returncode != 0 and "no trusted public keys" in result.stderr


def test_not_an_artifact(tmp_path):
    result = run_cli("verify", str(tmp_path), "--key", "x.pub", check=False)
    assert result.returncode != 0 and "has no manifest.json" in result.stderr


def test_inspect_shows_manifest(artifact, digits_artifacts):
    shown = run_cli("inspect", str(artifact), "--key", str(digits_artifacts["pub"]))
    assert "x86_64-avx2" in shown.stdout and "valid" in shown.stdout and "model.so" in shown.stdout
    as_json = json.loads(run_cli("inspect", str(artifact), "--json").stdout)
    assert as_json["payload"] == {"format": "tvm-relax-so", "entry": "model.so"}


def test_keys_generate_refuses_to_overwrite(tmp_path):
    run_cli("keys", "generate", "--name", "k", "--dir", str(tmp_path))
    assert oct((tmp_path / "k.key").stat().st_mode & 0o777) == "0o600"
    again = run_cli("keys", "generate", "--name", "k", "--dir", str(tmp_path), check=False)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_build_signs_with_given_key(tmp_path, digits_artifacts):
    run_cli("keys", "generate", "--name", "team", "--dir", str(tmp_path / "keys"))
    out = tmp_path / "dist"
    built = json.loads(run_cli("build", DIGITS, "--input-shape", "1,1,8,8", "-t", "x86_64-avx2", "-o", str(out),
                               "--key", str(tmp_path / "keys" / "team.key"), "--json").stdout)
    path = built["artifacts"][0]["path"]
    signature = json.loads((Path(path) / "manifest.sig").read_text())
    assert signature["algorithm"] == "ed25519" and signature["public_key"] == (tmp_path / "keys" / "team.pub").read_text().strip()
    run_cli("verify", path, "--key", str(tmp_path / "keys" / "team.pub"))
    assert run_cli("verify", path, "--key", str(digits_artifacts["pub"]), check=False).returncode != 0


def test_targets_command(tmp_path):
    table = run_cli("targets").stdout
    assert "rpi4-aarch64" in table and "x86_64-avx2" in table
    data = json.loads(run_cli("targets", "--json").stdout)
    by_name = {t["name"]: t for t in data["targets"]}
    assert {"x86_64-avx2", "android-arm64-tflite"} <= set(by_name)
    assert data["host"] in by_name and by_name[data["host"]]["proof_here"] == {"possible": True, "how": "native"}
    from edgesmith.toolchain.prove import aarch64_bundle

    # `make test` bootstraps first, and bootstrap builds the aarch64 runtime: Arm proofs are
    # possible here, and a missing runtime is a broken environment, not a reason to pass.
    runner = aarch64_bundle() / "bin" / "edgesmith-run"
    assert runner.is_file(), (f"{runner} is missing; run the bootstrap's step `edgesmith tools install aarch64-runtime` "
                              "(or `rm .venv/.bootstrapped && make bootstrap`)")
    assert by_name["rpi4-aarch64"]["proof_here"] == {"possible": True, "how": "qemu-aarch64"}
    assert by_name["android-arm64-tflite"]["proof_here"]["possible"] is False


def test_targets_command_without_aarch64_runtime(tmp_path):
    data = json.loads(run_cli("targets", "--json", env={"EDGESMITH_AARCH64_RUNTIME": str(tmp_path / "none")}).stdout)
    rpi4 = {t["name"]: t for t in data["targets"]}["rpi4-aarch64"]["proof_here"]
    assert rpi4["possible"] is False and str(tmp_path / "none") in rpi4["how"] and "tools install aarch64-runtime" in rpi4["how"]


def test_a_home_made_under_a_group_writable_umask_is_still_trusted(tmp_path, monkeypatch):
    """Under a 002 umask (Ubuntu's default for users), the directories edgesmith makes for keys are
    still 0700: the device rule refuses a key directory the group could write, and must not refuse
    edgesmith's own."""
    import os
    import stat

    from edgesmith.toolchain.signing import generate_deploy_key, generate_key

    home = tmp_path / "made" / "home"
    monkeypatch.setenv("EDGESMITH_HOME", str(home))
    old = os.umask(0o002)
    try:
        generate_key("default")
        generate_deploy_key()
    finally:
        os.umask(old)
    for folder in (home.parent, home, home / "keys", home / "keys" / "deploy"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    from edgesmith.runtime import keys

    assert keys.edgesmith_home() == home
    assert len(keys.trusted_public_keys()) == 1  # the C++ rule takes the home's keys: not refused as group-writable

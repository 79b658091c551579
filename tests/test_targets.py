"""Targets as data: every file loads, inheritance works, mistakes are reported by file and key."""

from __future__ import annotations

import json
import tomllib

import pytest

from edgesmith.toolchain import targets
from edgesmith.toolchain.errors import UserError

REQUIRED = {"x86_64-avx2", "x86_64-avx512", "rpi4-aarch64", "rpi5-aarch64", "jetson-orin-cpu", "android-arm64-tflite"}


def test_every_target_file_loads():
    directory = targets.builtin_targets_dir()
    files = sorted(directory.glob("*.toml"))
    loaded = targets.all_targets()
    assert REQUIRED <= set(loaded)
    for path in files:
        if path.name.startswith("_"):
            tomllib.loads(path.read_text())  # bases must at least parse...
            users = [t for t in loaded.values() if tomllib.loads((directory / f"{t.name}.toml").read_text()).get("extends") == path.stem]
            assert users, f"base {path.name} is extended by no target"  # ...and be used
        else:
            target = targets.load_target_file(path)
            assert target.name == path.stem
            assert target.backends, path


def test_extends_merges_base_and_child():
    rpi4 = targets.get_target("rpi4-aarch64")
    assert rpi4.isa == "aarch64" and rpi4.proof == "qemu-aarch64"  # from the base
    assert rpi4.tvm.target == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "num-cores": 4}
    assert rpi4.tvm.cross_compiler == "aarch64-linux-gnu-g++"
    assert targets.get_target("rpi5-aarch64").tvm.target["mcpu"] == "cortex-a76"
    assert targets.get_target("jetson-orin-cpu").tvm.target["mcpu"] == "cortex-a78ae"


def test_each_target_is_consistent():
    """What the schema cannot check alone: the parts of one target that must agree with each other."""
    for target in targets.all_targets().values():
        # The spec recorded in manifests is the whole target: validated again, it is the same target.
        again = targets.Target.model_validate(json.loads(json.dumps(target.spec())))
        assert again == target.model_copy(update={"source": ""}), target.name
        fp16, fp32 = target.tolerance.fp16, target.tolerance.fp32
        assert fp16.atol >= fp32.atol and fp16.rtol >= fp32.rtol, target.name
        if target.tvm is not None:
            # A TVM triple for another ISA would compile code the board cannot run.
            assert target.tvm.target["mtriple"].split("-")[0] == target.isa, target.name
            assert target.tvm.target.get("num-cores", target.threads) == target.threads, target.name
    assert targets.get_target("android-arm64-tflite").backends == ["tflite"]


def test_host_resolves_to_a_target_this_machine_runs():
    host = targets.get_target("host")
    assert targets.runs_natively(host)
    assert host.isa == targets.host_isa()


def test_unknown_target_suggests_close_names():
    with pytest.raises(UserError, match=r"unknown target 'rpi4-arm64'; did you mean rpi4-aarch64"):
        targets.get_target("rpi4-arm64")


@pytest.mark.parametrize("body, key", [
    ('extends = "_linux-x86_64"\ndescription = "x"\nthreads = 0\n[tvm.target]\nmcpu = "haswell"\n', "threads"),
    ('extends = "_linux-x86_64"\ndescription = "x"\nthreads = 2\nbackends = ["tensorrt"]\n', "backends.0"),
    ('extends = "_linux-x86_64"\ndescription = "x"\nthreads = 2\ncolour = "red"\n', "colour"),
    ('extends = "_linux-x86_64"\ndescription = "x"\nthreads = 2\n[tvm.target]\nkind = "cuda"\n', "tvm.target"),
    ('extends = "_linux-x86_64"\ndescription = "x"\nthreads = 2\n[tvm.target]\nmcpu = "native"\n', "tvm.target"),
    ('extends = "_no-such-base"\n', "extends"),
])
def test_invalid_target_file_names_file_and_key(tmp_path, monkeypatch, body, key):
    path = tmp_path / "my-board.toml"
    path.write_text(body)
    monkeypatch.setenv("EDGESMITH_TARGETS_PATH", str(tmp_path))
    with pytest.raises(UserError) as info:
        targets.load_target_file(path)
    message = str(info.value)
    assert str(path) in message and key in message


def test_invalid_toml_is_reported(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("isa = \n")
    with pytest.raises(UserError, match="broken.toml is not valid TOML"):
        targets.load_target_file(path)


def test_extends_cycle_is_reported(tmp_path, monkeypatch):
    (tmp_path / "_a.toml").write_text('extends = "_b"\n')
    (tmp_path / "_b.toml").write_text('extends = "_a"\n')
    (tmp_path / "c.toml").write_text('extends = "_a"\n')
    monkeypatch.setenv("EDGESMITH_TARGETS_PATH", str(tmp_path))
    with pytest.raises(UserError, match="cycle"):
        targets.load_target_file(tmp_path / "c.toml")


def test_user_target_directory_adds_targets(tmp_path, monkeypatch):
    (tmp_path / "my-board.toml").write_text('extends = "_linux-aarch64"\ndescription = "my board"\nthreads = 2\n[tvm.target]\nmcpu = "cortex-a53"\n')
    monkeypatch.setenv("EDGESMITH_TARGETS_PATH", str(tmp_path))
    targets._load_all.cache_clear()
    assert targets.get_target("my-board").tvm.target["mcpu"] == "cortex-a53"

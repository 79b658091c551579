"""An install without extras: a command needing a package of an extra says which, in one sentence.

The CLI runs in a subprocess whose ``sys.meta_path`` hides every package that only an extra
installs (what `pip install edgesmith` without extras lacks: the distributions of the extras
minus those edgesmith's own dependencies pull in), so each command meets the missing package where
it really imports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import pytest

from conftest import REPO
from edgesmith.toolchain import extras

pytestmark = pytest.mark.timeout(120)

RUN_HIDDEN = """
import sys, importlib.abc
HIDDEN = set(sys.argv[1].split(","))

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Hide())
sys.argv = ["edgesmith", *sys.argv[2:]]
from edgesmith.toolchain.cli import main
main()
"""


def _pyproject_extras() -> dict[str, list[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {extra: [extras.normalise(r.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip()) for r in reqs]
            for extra, reqs in project["optional-dependencies"].items()}


def _base_closure() -> set[str]:
    """Distributions `pip install edgesmith` brings without extras (edgesmith's dependencies, transitively)."""
    seen: set[str] = set()
    todo = [line for line in requires("edgesmith") or [] if "extra ==" not in line]
    while todo:
        name = extras.normalise(todo.pop().split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].split("!")[0].split("~")[0].strip())
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [line for line in requires(name) or [] if "extra ==" not in line]
        except PackageNotFoundError:
            pass
    return seen


def _hidden_modules() -> list[str]:
    base = _base_closure()
    wanted = {d for extra in ("runtime", "toolchain", "postgres") for d in _pyproject_extras()[extra]} - base
    return sorted(extras.import_name(d) for d in wanted)


def test_extras_come_from_pyproject():
    # the installed metadata is pyproject's lists (a stale editable install fails here: reinstall it)
    assert {e: sorted(d) for e, d in extras.extras_requirements().items()} == \
        {e: sorted(d) for e, d in _pyproject_extras().items()}


def test_every_installed_extra_package_has_its_import_name():
    installed = {}
    for module, distributions in packages_distributions().items():
        for d in distributions:
            installed.setdefault(extras.normalise(d), set()).add(module)
    checked = 0
    for extra in extras.PREFERENCE:
        for distribution in extras.extras_requirements()[extra]:
            if distribution in installed:
                assert extras.import_name(distribution) in installed[distribution], (distribution, installed[distribution])
                checked += 1
    assert checked >= 20


def test_suggested_extra():
    def message(module: str) -> str | None:
        return extras.missing_package_message(ModuleNotFoundError(f"No module named {module!r}", name=module))

    assert message("onnx") == ("this command needs onnx (module 'onnx' is not installed), which comes with "
                               "edgesmith's toolchain extra: pip install 'edgesmith[toolchain]'")
    assert "edgesmith[toolchain]" in message("onnxruntime")  # runtime and toolchain: the CLI's is toolchain
    assert "paho-mqtt" in message("paho.mqtt.client")
    assert "edgesmith[postgres]" in message("psycopg")
    assert message("pytest") is None  # the test extra is never suggested
    assert message("no_such_module_anywhere") is None  # a bug: the traceback is kept


def _run_hidden(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGESMITH_HOME": str(tmp_path / "home")}
    return subprocess.run([sys.executable, "-c", RUN_HIDDEN, ",".join(_hidden_modules()), *args], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=100)


@pytest.mark.parametrize("args, package", [
    (["build", "MODEL", "-t", "host", "-o", "dist"], "onnx"),
    (["train", str(REPO / "examples" / "digits.toml"), "--epochs", "1"], None),
    (["fleet", "status"], "sqlalchemy"),
    (["fleet", "monitor", "--broker", "broker"], "paho-mqtt"),
    (["tune", "MODEL", "-t", "host"], "onnx"),
])
def test_command_without_its_extra_is_one_sentence(tmp_path, args, package):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07")  # never read: the command needs onnx to read it
    result = _run_hidden(tmp_path, *[str(model) if a == "MODEL" else a for a in args])
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: this command needs "), result.stderr
    assert lines[0].endswith("pip install 'edgesmith[toolchain]'"), lines
    if package:
        assert f"needs {package} " in lines[0]
    assert not (tmp_path / "dist").exists()


@pytest.mark.integration
def test_broker_needs_no_extra(tmp_path):
    """The broker is Mosquitto and edgesmith's own code: it runs without any extra."""
    directory = tmp_path / "broker"
    up = _run_hidden(tmp_path, "broker", "up", "--dir", str(directory), "--json")
    try:
        assert up.returncode == 0, up.stderr
        assert json.loads(up.stdout)["monitor"]["username"]
        added = _run_hidden(tmp_path, "broker", "add-device", "dev-1", "--fleet", "f1", "--dir", str(directory), "--json")
        assert added.returncode == 0, added.stderr
    finally:
        down = _run_hidden(tmp_path, "broker", "down", "--dir", str(directory))
    assert down.returncode == 0, down.stderr

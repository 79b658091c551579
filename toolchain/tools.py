"""Isolated tool environments.

litert-torch's converter pulls ``xdsl==0.28.0``, which declares ``typing-extensions<4.13``, while
apache-tvm-ffi declares ``>=4.13``: no single resolver-consistent environment holds both. Instead
of forcing the pair, the converter lives in its own virtual environment under
``$EDGESMITH_HOME/tools/<name>`` and edgesmith talks to it through a subprocess and files
(a ``torch.export`` program in, a ``.tflite`` file out).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.files import private_dirs
from edgesmith.runtime.keys import edgesmith_home

TOOLS: dict[str, list[str]] = {
    # torch must equal the main environment's: torch.export programs are not portable across versions.
    # onnx2torch turns ONNX sources into PyTorch for litert-torch (bench/onnx_to_tflite_coverage.py);
    # onnx as in the main environment, which writes the models it reads. It pulls torchvision, whose
    # PyPI wheel is a CUDA build whose ops do not load here (_litert_convert.py works around that).
    "litert": ["torch==2.13.0", "litert-torch==0.10.0", "ai-edge-litert==2.3.0",
               "onnx2torch==1.5.15", "onnx==1.23.2", "torchvision==0.28.0"],
}


def tool_dir(name: str) -> Path:
    base = os.environ.get("EDGESMITH_TOOLS_DIR")
    return (Path(base) if base else edgesmith_home() / "tools") / name


def tool_python(name: str) -> Path | None:
    """The tool environment's interpreter, or None when it is not installed (or was installed with
    other packages than ``TOOLS`` lists now: ``install`` brings it up to date)."""
    override = os.environ.get(f"EDGESMITH_{name.upper()}_PYTHON")
    python = Path(override) if override else tool_dir(name) / "bin" / "python"
    marker = tool_dir(name) / ".complete"
    ready = override or (marker.is_file() and marker.read_text() == "\n".join(TOOLS[name]))
    return python if ready and python.is_file() else None


BUILT_TOOLS = {
    # The device runtime (edgesmith-run, backend plugins, engine libraries) cross-compiled for
    # aarch64, which `edgesmith prove` runs under qemu-aarch64-static.
    "aarch64-runtime": "scripts/build_aarch64_runtime.sh",
}


def _build_from_source(name: str, echo) -> Path:
    script = Path(__file__).resolve().parent.parent / BUILT_TOOLS[name]
    if not script.is_file():
        raise UserError(f"building the {name} needs an edgesmith source checkout ({script} is missing); "
                        "run this from a clone of the repository")
    echo(f"building the {name} with {script.name} ...")
    # The script knows only $EDGESMITH_HOME: hand it the home this process resolved (it may have
    # been found from the working directory).
    env = {**os.environ, "EDGESMITH_HOME": str(edgesmith_home())}
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise UserError(f"building the {name} failed:\n{tail}")
    return Path(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else script


def install(name: str, echo=print) -> Path:
    """Create (or complete) the tool environment; idempotent."""
    private_dirs(edgesmith_home())  # a home made here holds keys later: nobody else may write it
    if name in BUILT_TOOLS:
        return _build_from_source(name, echo)
    if name not in TOOLS:
        raise UserError(f"unknown tool {name!r}; known tools: {', '.join([*TOOLS, *BUILT_TOOLS])}")
    directory = tool_dir(name)
    marker = directory / ".complete"
    wanted = "\n".join(TOOLS[name])
    if marker.is_file() and marker.read_text() == wanted:
        return directory / "bin" / "python"
    echo(f"installing the {name} tool environment in {directory} ...")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(directory)], check=True)
    result = subprocess.run([str(directory / "bin" / "python"), "-m", "pip", "install", "--quiet", *TOOLS[name]],
                            capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise UserError(f"installing the {name} tool environment failed (pip said: {tail}); check network access to PyPI and retry")
    marker.write_text(wanted)
    return directory / "bin" / "python"

"""What ``edgesmith bench`` runs: edgesmith's artifacts (through ``Session``) and the peer engines
(their own Python APIs on the same ONNX model, or LiteRT on the same PyTorch module).

An ``Engine`` is everything a child process needs to load one of them (``_child.py``). Peers are a
registry keyed by the names ``--against`` takes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgesmith.toolchain.errors import BackendUnavailable, UserError
from edgesmith.toolchain.sources import ModelSource
from edgesmith.toolchain.targets import Target, all_targets, host_isa

PEERS = ("ort", "openvino", "litert")  # --against names, in report order
PEER_KINDS = {"ort": "ort", "openvino": "openvino", "litert": "litert"}
# edgesmith backends whose artifacts the device runtime (Session) runs; untuned TVM is ~80x slower
# than both, so it is benchmarked only when asked for (--backends tvm).
DEFAULT_BACKENDS = ("openvino", "ort")


@dataclass
class Engine:
    name: str  # "edgesmith:openvino", "ort", ...
    kind: str  # the child's loader: session | ort | openvino | litert
    role: str  # "edgesmith" | "peer"
    path: Path
    size_bytes: int  # what the engine loads: the payload (edgesmith), the .onnx or .tflite file (peers)
    precision: str = "fp32"
    extra: dict = field(default_factory=dict)  # loader arguments (trusted keys, LiteRT signature)


def parse_against(text: str | None) -> list[str] | None:
    """The peers named by ``--against`` (None: not given), checked before any model is loaded."""
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise UserError(f"--against names unknown engine {', '.join(repr(n) for n in unknown)}; valid engines are: {', '.join(PEERS)}")
    return list(dict.fromkeys(names))


def peers_for(names: list[str] | None, source: ModelSource) -> list[str]:
    """The peers to run: the ones named, or every peer that applies (LiteRT only for PyTorch sources
    with its converter installed)."""
    if names is None:
        from edgesmith.toolchain import tools

        names = ["ort", "openvino"]
        if source.module is not None and tools.tool_python("litert") is not None:
            names.append("litert")
        return names
    if "litert" in names and source.module is None:
        raise UserError(f"--against litert converts from PyTorch, and {source.ref} is an ONNX file; pass the model as a "
                        "PyTorch `module:callable` with --input-shape, or drop litert")
    return names


def parse_backends(text: str | None, target: Target) -> list[str]:
    from edgesmith.toolchain.backends import get_backend

    if text is None:
        return [b for b in DEFAULT_BACKENDS if b in target.backends]
    names = list(target.backends) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in target.backends:
            raise UserError(f"target {target.name} does not list backend {name!r}; its backends are: {', '.join(target.backends)}")
    runnable = [n for n in names if getattr(get_backend(n), "DEVICE_RUNTIME", False)]
    if not runnable and names:
        raise UserError(f"none of {', '.join(names)} runs in edgesmith's device runtime; pick from openvino, ort, tflite, tvm")
    return runnable


def peer_engines(source: ModelSource, names: list[str], work: Path, status=lambda _: None) -> list[Engine]:
    """The peers on the source's own ONNX graph (LiteRT: on its PyTorch module)."""
    onnx_path = work / f"{source.name}.onnx"
    onnx_path.write_bytes(source.onnx_bytes)
    engines = []
    for name in names:
        if name == "litert":
            status("converting the PyTorch module to LiteRT")
            engines.append(_litert(source, work))
        else:
            engines.append(Engine(name=name, kind=PEER_KINDS[name], role="peer", path=onnx_path,
                                  size_bytes=onnx_path.stat().st_size))
    return engines


def _litert(source: ModelSource, work: Path) -> Engine:
    from edgesmith.toolchain.backends import get_backend
    from edgesmith.toolchain.backends.base import CompileRequest

    backend = get_backend("tflite")
    try:
        backend.version()
    except BackendUnavailable as e:
        raise UserError(f"--against litert: {e}") from None
    # The tflite settings (delegate) live in the targets that list the backend.
    target = next(t for t in all_targets().values() if "tflite" in t.backends)
    out, scratch = work / "litert", work / "litert-work"
    out.mkdir()
    scratch.mkdir()
    result = backend.compile(CompileRequest(source=source, target=target, precision="fp32", out_dir=out, work_dir=scratch))
    path = out / result.entry
    return Engine(name="litert", kind="litert", role="peer", path=path, size_bytes=path.stat().st_size,
                  extra={k: result.options[k] for k in ("signature", "input_names", "output_names")})


def payload_bytes(manifest: dict) -> int:
    """Bytes the device loads: every file of the artifact but its golden samples."""
    return sum(f["size"] for f in manifest["files"] if not f["path"].startswith("golden/"))


def artifact_engine(path: Path, trusted_keys: list[bytes]) -> Engine:
    """A prebuilt artifact directory, refused unless this machine runs its ISA natively."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"--artifacts {path} is not an edgesmith artifact (no manifest.json); pass a directory `edgesmith build` wrote")
    manifest = json.loads(manifest_path.read_text())
    target, backend = manifest["target"], manifest["backend"]["name"]
    if target["isa"] != host_isa() or target.get("os", "linux") != "linux":
        raise UserError(f"{path} is built for {target['name']} ({target['isa']}, {target.get('os', 'linux')}) and this machine is "
                        f"{host_isa()} Linux: timings under emulation mean nothing, so benchmark it on a {target['isa']} device "
                        "or build the model for -t host")
    missing = missing_cpu_features_of(target.get("cpu_features", []))
    if missing:
        raise UserError(f"{path} is built for {target['name']}, which needs CPU features this machine lacks ({', '.join(missing)}); "
                        "build the model for -t host")
    from edgesmith.toolchain.backends import get_backend

    if not getattr(get_backend(backend), "DEVICE_RUNTIME", False):
        raise UserError(f"{path} holds a {backend} payload, which edgesmith's device runtime does not run; benchmark it with --against litert")
    return Engine(name=f"edgesmith:{backend}", kind="session", role="edgesmith", path=path,
                  size_bytes=payload_bytes(manifest), precision=manifest["backend"].get("precision", "fp32"),
                  extra={"trusted_keys": [k.hex() for k in trusted_keys]})


def missing_cpu_features_of(features: list[str]) -> list[str]:
    """The features (as a manifest lists them) this machine lacks, by the runtime's own check."""
    from edgesmith.runtime import _core

    return list(_core.cpu_features_missing(list(features)))

"""Model sources: an ONNX file, a PyTorch ``module:callable`` exported to ONNX, or a registered
model version (``models:/...``, toolchain/registry.py).

Whatever the user hands over, the stages after this one see one thing: a ``ModelSource`` with a
static-shape ONNX graph and its input/output specs. PyTorch sources keep the module too, for
backends that convert from PyTorch directly (LiteRT).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import logging
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np

from edgesmith.runtime.artifact import sha256_file
from edgesmith.runtime.manifest import DType, TensorSpec
from edgesmith.toolchain.errors import UserError, first_line

InputShapes = dict[str, list[int]]


@dataclass
class ModelSource:
    name: str
    kind: str  # "onnx" | "pytorch"
    ref: str
    sha256: str
    onnx_model: Any  # onnx.ModelProto with static input shapes
    inputs: list[TensorSpec]
    module: Any = None  # torch.nn.Module for PyTorch sources
    example_inputs: tuple = field(default_factory=tuple)
    registry: Any = None  # toolchain.registry.RegistryVersion for models:/ sources
    samples: list[list[np.ndarray]] | None = None  # real inputs the source came with (held-out data)
    samples_origin: str | None = None

    @property
    def onnx_bytes(self) -> bytes:
        return self.onnx_model.SerializeToString()

    @property
    def onnx_sha256(self) -> str:
        return hashlib.sha256(self.onnx_bytes).hexdigest()

    @property
    def opset(self) -> int:
        return next((o.version for o in self.onnx_model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def operators(self) -> set[str]:
        return {node.op_type for node in self.onnx_model.graph.node}


def parse_input_shapes(values: list[str]) -> InputShapes | list[int] | None:
    """``["1,3,224,224"]`` (the only input) or ``["data=1,3,224,224", ...]`` (by name)."""
    if not values:
        return None
    named: InputShapes = {}
    for value in values:
        name, sep, dims = value.rpartition("=")
        try:
            shape = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            shape = []
        if not shape or any(d <= 0 for d in shape):
            raise UserError(f"--input-shape {value!r} is not a shape; write it as 1,3,224,224 or NAME=1,3,224,224")
        if not sep:
            if len(values) > 1:
                raise UserError("with several --input-shape options, name each input: NAME=1,3,224,224")
            return shape
        named[name] = shape
    return named


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-.").lower() or "model"


SUPPORTED_DTYPES = get_args(DType)  # what a manifest, the C++ runtime and every plugin take


def tensor_spec(name: str, dtype: str, shape: list[int], what: str, ref: str) -> TensorSpec:
    """A TensorSpec, or one sentence naming a dtype edgesmith does not take (float8, int4, string...)."""
    if dtype not in SUPPORTED_DTYPES:
        raise UserError(f"{what} {name!r} of {ref} has dtype {dtype}, which edgesmith does not take; "
                        f"it takes {', '.join(SUPPORTED_DTYPES)}: cast it in the model (or export it with one of those)")
    return TensorSpec(name=name, dtype=dtype, shape=shape)


def _onnx_dtype(elem_type: int) -> str:
    import onnx

    try:
        name = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
        if name != "object":  # strings
            return name
    except Exception:  # a type NumPy has no dtype for
        pass
    try:
        return onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"ONNX element type {elem_type}"


def _graph_inputs(model) -> list:
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _fix_input_shapes(model, shapes: InputShapes | list[int] | None, ref: str) -> list[TensorSpec]:
    """Make every graph input static, from the model itself or from --input-shape."""
    inputs = _graph_inputs(model)
    if isinstance(shapes, list):
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise UserError(f"{ref} has {len(inputs)} inputs ({names}); name each one: --input-shape NAME=1,3,224,224")
        shapes = {inputs[0].name: shapes}
    shapes = dict(shapes or {})
    unknown = set(shapes) - {i.name for i in inputs}
    if unknown:
        names = ", ".join(i.name for i in inputs)
        raise UserError(f"--input-shape names {', '.join(sorted(unknown))}, but the inputs of {ref} are: {names}")
    specs = []
    for inp in inputs:
        tensor_type = inp.type.tensor_type
        dims = tensor_type.shape.dim
        if inp.name in shapes:
            shape = shapes[inp.name]
            if len(shape) != len(dims):
                raise UserError(f"--input-shape for {inp.name!r} has {len(shape)} dimensions, the model's input has {len(dims)}")
            for dim, value in zip(dims, shape):
                if dim.HasField("dim_value") and dim.dim_value not in (0, value):
                    raise UserError(f"--input-shape for {inp.name!r} sets {value} where the model fixes {dim.dim_value}")
                dim.Clear()
                dim.dim_value = value
        elif any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims):
            pretty = ",".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)
            if all(d.HasField("dim_value") for d in dims):  # a 0: an empty tensor, or an old exporter's "unknown"
                raise UserError(f"input {inp.name!r} of {ref} has shape [{pretty}] with a dimension of size 0; edgesmith "
                                f"artifacts take non-empty tensors of static shape: if the 0 means unknown, give the shape "
                                f"with --input-shape {inp.name}=1,...")
            raise UserError(f"input {inp.name!r} of {ref} has dynamic shape [{pretty}]; give a static one with --input-shape {inp.name}=1,...")
        specs.append(tensor_spec(inp.name, _onnx_dtype(tensor_type.elem_type), [d.dim_value for d in dims], "input", ref))
    return specs


def _load_onnx(path: Path, shapes) -> ModelSource:
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises DecodeError, ValidationError, OSError...
        raise UserError(f"{path} is not a valid ONNX model ({first_line(e)}); pass an .onnx file or a PyTorch `module:callable`") from None
    if not model.graph.node:
        raise UserError(f"{path} is an ONNX file with an empty graph; export the model again")
    specs = _fix_input_shapes(model, shapes, str(path))
    for out in model.graph.output:  # before ONNX Runtime runs it: a float8/int4/string output has no NumPy dtype
        if out.type.HasField("tensor_type"):
            tensor_spec(out.name, _onnx_dtype(out.type.tensor_type.elem_type), [], "output", str(path))
    return ModelSource(name=_safe_name(path.stem), kind="onnx", ref=str(path),
                       sha256=sha256_file(path), onnx_model=model, inputs=specs)


def _import_callable(ref: str):
    module_ref, _, attr = ref.rpartition(":")
    if module_ref.endswith(".py"):
        path = Path(module_ref)
        if not path.is_file():
            raise UserError(f"model file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"edgesmith_user_model_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise UserError(f"importing {path} failed: {type(e).__name__}: {e}") from None
        source_file = path
    else:
        try:
            module = importlib.import_module(module_ref)
        except ImportError as e:
            raise UserError(f"cannot import {module_ref!r} ({e}); pass `package.module:callable` or `path/to/file.py:callable`") from None
        source_file = Path(module.__file__) if getattr(module, "__file__", None) else None
    try:
        return getattr(module, attr), source_file
    except AttributeError:
        raise UserError(f"{module_ref} has no attribute {attr!r}") from None


def export_to_onnx(module, example_inputs: tuple, input_names: list[str]):
    """Export with torch.onnx's dynamo exporter into one self-contained ModelProto."""
    import torch

    # The exporter prints progress to stdout and warns about optional packages (torchvision): keep
    # edgesmith's stdout clean (it may be --json) and show the chatter only when export fails.
    chatter = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(module, example_inputs, None, input_names=input_names, dynamo=True,
                                        external_data=False, verbose=False, optimize=True)
    except Exception as e:
        raise UserError(f"torch.onnx.export failed: {first_line(e)}") from None
    return program.model_proto


def make_module(ref: str):
    """Call the ``module:callable`` / ``file.py:callable`` that builds a PyTorch model; returns the
    nn.Module and the callable's source file. A failing call or a non-module is one sentence."""
    import torch

    factory, source_file = _import_callable(ref)
    try:
        module = factory()
    except Exception as e:
        raise UserError(f"calling {ref}() failed: {type(e).__name__}: {first_line(e)}") from None
    if not isinstance(module, torch.nn.Module):
        raise UserError(f"{ref}() returned {type(module).__name__}, not a torch.nn.Module")
    return module, source_file


def _load_pytorch(ref: str, shapes) -> ModelSource:
    import torch

    module, source_file = make_module(ref)
    if shapes is None:
        raise UserError(f"a PyTorch source needs --input-shape (e.g. --input-shape 1,3,224,224) to export {ref}")
    if isinstance(shapes, dict):
        names, shape_list = list(shapes), list(shapes.values())
    else:
        names, shape_list = ["input"], [shapes]
    module = module.eval()
    generator = torch.Generator().manual_seed(0)
    example = tuple(torch.randn(*s, generator=generator) for s in shape_list)
    try:
        with torch.no_grad():
            module(*example)
    except Exception as e:
        shapes_text = ", ".join(str(list(s)) for s in shape_list)
        raise UserError(f"{ref} fails on an input of shape {shapes_text} ({type(e).__name__}: {first_line(e)}); check --input-shape") from None
    model = export_to_onnx(module, example, names)
    specs = _fix_input_shapes(model, None, ref)
    _check_export(module, example, model, ref)
    name = _safe_name(ref.rpartition(":")[2])
    digest = sha256_file(source_file) if source_file and source_file.is_file() else hashlib.sha256(ref.encode()).hexdigest()
    return ModelSource(name=name, kind="pytorch", ref=ref, sha256=digest, onnx_model=model, inputs=specs,
                       module=module, example_inputs=example)


def _check_export(module, example: tuple, model, ref: str) -> None:
    """The exported graph must compute what the PyTorch module computes."""
    import torch

    from edgesmith.toolchain.reference import ReferenceModel

    with torch.no_grad():
        expected = module(*example)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    got = ReferenceModel(model).run([t.numpy() for t in example])
    for e, g in zip(expected, got):
        e = e.numpy()
        if e.shape != g.shape or not np.allclose(g, e, atol=1e-4, rtol=1e-3):
            err = float(np.max(np.abs(g - e))) if e.shape == g.shape else float("inf")
            raise UserError(f"the ONNX export of {ref} differs from PyTorch (max abs error {err:.3g}); the model uses an op the exporter translates wrongly")


def load_source(ref: str, input_shapes: InputShapes | list[int] | None = None, name: str | None = None) -> ModelSource:
    """Resolve a model reference: a path to an .onnx file, ``module:callable``, or a registered
    version (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``)."""
    from edgesmith.toolchain import registry

    path = Path(ref)
    if registry.is_registry_ref(ref):
        if input_shapes:
            raise UserError(f"{ref} is registered with static input shapes; drop --input-shape")
        source = registry.load_registry_source(ref)
    elif path.is_file():
        source = _load_onnx(path, input_shapes)
    elif ":" in ref and not path.suffix == ".onnx":
        source = _load_pytorch(ref, input_shapes)
    elif path.suffix == ".onnx" or not ref:
        raise UserError(f"model file {ref} does not exist")
    elif path.is_dir():
        raise UserError(f"{ref} is a directory; pass an .onnx file or a PyTorch `module:callable`")
    else:
        raise UserError(f"{ref} is neither an existing .onnx file nor a PyTorch `module:callable`")
    if name:
        source.name = _safe_name(name)
    return source

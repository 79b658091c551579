"""Pre-flight operator coverage: which operators of an ONNX model each candidate backend of a target
cannot compile, without compiling anything (``edgesmith check``, docs/onnx_coverage.md).

Two sources, per backend:

- the frontend's own tables: ONNX Runtime's CPU kernel registrations (op, version range, type
  constraints; an op with an ONNX function body is inlined, so it needs no kernel); OpenVINO's ONNX
  frontend converting the graph partially (what it cannot translate stays a framework node); TVM's
  Relax ONNX frontend's convert map; onnx2torch's converter registry in the LiteRT converter
  environment (the tflite backend's route, with the older-converter fallback it applies);
- conditions learnt by the conformance runner (``bench/onnx_conformance.py`` writes
  ``CONDITIONS``): ONNX's own single-operator test cases that a backend refused although its table
  lists the operator. A case's *features* are the node's non-constant inputs, attribute values and
  input dtypes; the features a refused case has and no passing case of the same operator has are the
  condition (TopK on TVM: input 1 ``K`` is not a constant). A model's node meets the condition when it
  has all of them.
"""

from __future__ import annotations

import functools
import json
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONDITIONS = Path(__file__).with_name("onnx_conditions.json")
DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Gap:
    """An operator one backend cannot compile, and why."""

    backend: str
    op: str
    domain: str
    opset: int
    why: str
    source: str  # "frontend" (the backend's own table) or "conformance" (a learnt condition)

    @property
    def operator(self) -> str:
        where = "" if self.domain in DEFAULT_DOMAINS else f"{self.domain}."
        return f"{where}{self.op} (opset {self.opset})"

    def line(self) -> str:
        return f"{self.operator}: {self.why}"


@dataclass
class BackendCoverage:
    backend: str
    checked: bool  # False when the backend (or its converter) is not installed here
    gaps: list[Gap] = field(default_factory=list)
    note: str | None = None

    @property
    def can_compile(self) -> bool | None:
        return None if not self.checked else not self.gaps

    def summary(self) -> str:
        """One line: what this backend cannot compile."""
        if not self.checked:
            return f"{self.backend}: not checked ({self.note})"
        if not self.gaps:
            return f"{self.backend}: every operator is covered"
        return f"{self.backend} cannot compile " + "; ".join(g.line() for g in self.gaps)

    def to_json(self) -> dict:
        return {"backend": self.backend, "checked": self.checked, "can_compile": self.can_compile,
                "note": self.note, "gaps": [asdict(g) | {"operator": g.operator} for g in self.gaps]}


# ------------------------------------------------------------------ the model's nodes and their features

@dataclass
class Node:
    op: str
    domain: str
    opset: int  # the model's opset of the node's domain
    since: int  # the operator version that opset selects (ONNX schema's since_version)
    inputs: list[str]
    input_types: list[str | None]  # "float", "int64", ... (None: unknown or absent)
    output_types: list[str | None]
    constant: list[bool]  # per input: an initializer or a Constant node's output
    attributes: dict[str, str]


def _opsets(model) -> dict[str, int]:
    return {("" if o.domain in DEFAULT_DOMAINS else o.domain): o.version for o in model.opset_import}


def _since(op: str, domain: str, opset: int) -> int:
    from onnx import defs

    try:
        return defs.get_schema(op, max_inclusive_version=opset, domain=domain).since_version
    except Exception:
        return opset


def _type_name(value_type) -> str | None:
    from onnx import TensorProto

    if not value_type.HasField("tensor_type") or not value_type.tensor_type.elem_type:
        return None
    return TensorProto.DataType.Name(value_type.tensor_type.elem_type).lower()


def _attribute(attr) -> str | None:
    """A short, comparable rendering of an attribute value (graphs and tensors are left out)."""
    from onnx import helper

    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, (int, float, str)):
        return repr(value)
    if isinstance(value, list) and all(isinstance(v, (int, float, bytes, str)) for v in value) and len(value) <= 8:
        return repr([v.decode(errors="replace") if isinstance(v, bytes) else v for v in value])
    return None


def nodes(model) -> list[Node]:
    """Every node of the main graph (and of its subgraphs, by operator only), with its features."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        inferred = model
    graph = inferred.graph
    types = {v.name: _type_name(v.type) for v in [*graph.input, *graph.value_info, *graph.output]}
    types.update({i.name: onnx.TensorProto.DataType.Name(i.data_type).lower() for i in graph.initializer})
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    opsets = _opsets(model)
    found = []

    def visit(graph_nodes, top: bool) -> None:
        for n in graph_nodes:
            domain = "" if n.domain in DEFAULT_DOMAINS else n.domain
            opset = opsets.get(domain, 1)
            attrs = {a.name: r for a in n.attribute if (r := _attribute(a)) is not None}
            found.append(Node(op=n.op_type, domain=domain, opset=opset, since=_since(n.op_type, domain, opset),
                              inputs=list(n.input),
                              input_types=[types.get(i) if top and i else None for i in n.input],
                              output_types=[types.get(o) if top and o else None for o in n.output],
                              constant=[bool(i) and i in constants for i in n.input], attributes=attrs))
            for a in n.attribute:
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    visit(g.node, False)

    visit(graph.node, True)
    return found


def _input_names(node: Node) -> list[str]:
    from onnx import defs

    try:
        schema = defs.get_schema(node.op, max_inclusive_version=node.opset, domain=node.domain)
        names = [p.name for p in schema.inputs]
    except Exception:
        names = []
    return [names[min(i, len(names) - 1)] if names else f"#{i}" for i in range(len(node.inputs))]


def features(node: Node) -> dict[str, str]:
    """Feature key → how to say it: the node's non-constant inputs (after the first), attribute
    values and input dtypes: what the learnt conditions are written in."""
    names = _input_names(node)
    found = {}
    for i, (name, const, dtype) in enumerate(zip(node.inputs, node.constant, node.input_types)):
        if not name:
            continue
        if i > 0 and not const:
            found[f"nonconst:{i}"] = f"input {i} '{names[i]}' is not a constant"
        if dtype:
            found[f"dtype:{i}:{dtype}"] = f"input {i} '{names[i]}' is {dtype}"
    for key, value in node.attributes.items():
        found[f"attr:{key}={value}"] = f"{key}={value}"
    return found


# ------------------------------------------------------------------ the frontends' own tables

@functools.lru_cache(maxsize=1)
def _ort_kernels() -> dict[tuple[str, str], list]:
    import onnxruntime.capi._pybind_state as C

    kernels: dict[tuple[str, str], list] = {}
    for k in C.get_all_opkernel_def():
        if k.provider == "CPUExecutionProvider":
            domain = "" if k.domain in DEFAULT_DOMAINS else k.domain
            kernels.setdefault((domain, k.op_name), []).append((k.version_range, k.type_constraints))
    return kernels


def _has_function(node: Node) -> bool:
    from onnx import defs

    try:
        schema = defs.get_schema(node.op, max_inclusive_version=node.opset, domain=node.domain)
    except Exception:
        return False
    return bool(schema.has_function or schema.has_context_dependent_function)


def _type_bindings(node: Node) -> dict[str, str]:
    """Type-constraint name (T, T1, I...) → the node's tensor type, from the schema's formal parameters."""
    from onnx import defs

    try:
        schema = defs.get_schema(node.op, max_inclusive_version=node.opset, domain=node.domain)
    except Exception:
        return {}
    bound = {}
    for params, types in ((schema.inputs, node.input_types), (schema.outputs, node.output_types)):
        for i, t in enumerate(types):
            if t and params:
                p = params[min(i, len(params) - 1)]
                bound.setdefault(p.type_str, f"tensor({t})")
    return bound


def _ort_gap(node: Node) -> str | None:
    import onnxruntime

    if node.op == "Constant" and node.domain == "":
        return None  # folded into an initializer when the session is created
    kernels = _ort_kernels().get((node.domain, node.op), [])
    fitting = [(r, c) for r, c in kernels if r[0] <= node.since <= r[1]]
    if not fitting:
        if node.domain == "" and _has_function(node):
            return None  # ONNX Runtime inlines the operator's ONNX function body
        have = sorted({f"{r[0]}-{r[1]}" if r[1] < 2**31 - 1 else f"{r[0]}+" for r, _ in kernels})
        return (f"ONNX Runtime {onnxruntime.__version__} has no CPU kernel for it"
                + (f" at operator version {node.since} (kernels for versions {', '.join(have)})" if have else ""))
    bound = _type_bindings(node)
    def accepts(name: str, allowed: list[str]) -> bool:
        # a float16/bfloat16 tensor reaches a float kernel through the casts ONNX Runtime inserts
        have = bound.get(name)
        return have is None or have in allowed or (have in ("tensor(float16)", "tensor(bfloat16)") and "tensor(float)" in allowed)

    for _, constraints in fitting:
        if all(accepts(name, allowed) for name, allowed in constraints.items()):
            return None
    wanted = ", ".join(f"{k}={v}" for k, v in bound.items() if any(k in c for _, c in fitting))
    return f"ONNX Runtime {onnxruntime.__version__} has no CPU kernel for {wanted}"


def _ort_session_gap(model) -> str | None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        text = str(e).strip()
        return text.splitlines()[0] if text else type(e).__name__
    return None


def _ort(model, graph_nodes: list[Node]) -> list[tuple[Node, str]]:
    gaps = [(n, why) for n in graph_nodes if (why := _ort_gap(n))]
    if not gaps:
        # ONNX Runtime's own session creation is cheap and catches what the table cannot see
        error = _ort_session_gap(model)
        if error and "NOT_IMPLEMENTED" in error:
            op = next((n for n in graph_nodes if f"implementation for {n.op}(" in error), None)
            if op is not None:
                gaps.append((op, f"ONNX Runtime cannot create a session: {error}"))
    return gaps


def _tvm(model, graph_nodes: list[Node]) -> list[tuple[Node, str]]:
    import tvm
    from tvm.relax.frontend.onnx import onnx_frontend

    known = set(onnx_frontend._get_convert_map())
    return [(n, f"TVM {tvm.__version__}'s Relax ONNX frontend has no converter for it")
            for n in graph_nodes if n.op not in known]


def _openvino(model, graph_nodes: list[Node]) -> list[tuple[Node, str]]:
    import openvino
    import onnx
    from openvino.frontend import FrontEndManager

    version = openvino.__version__.split("-")[0]
    frontend = FrontEndManager().load_by_framework("onnx")
    gaps = []
    with tempfile.TemporaryDirectory(prefix="edgesmith-check-") as work:
        path = Path(work) / "model.onnx"
        onnx.save(model, str(path))
        try:
            loaded = frontend.load(str(path))  # kept alive: the converted model's framework nodes point into it
            converted = frontend.convert_partially(loaded)
        except Exception as e:
            text = str(e).strip().splitlines()
            return [(graph_nodes[0], f"OpenVINO {version}'s ONNX frontend cannot read the model: {text[0] if text else type(e).__name__}")]
        for op in converted.get_ordered_ops():
            type_name = op.get_type_name()
            if "FrameworkNode" not in type_name and "NotSupported" not in type_name:
                continue
            attrs = op.get_attributes()
            name, domain = attrs.get("ONNX_META_type", type_name), attrs.get("ONNX_META_domain", "")
            domain = "" if domain in DEFAULT_DOMAINS else domain
            node = next((n for n in graph_nodes if n.op == name and n.domain == domain), None)
            error = attrs.get("ONNX_META_error_message") or attrs.get("error_message")
            why = f"OpenVINO {version}'s ONNX frontend cannot translate it" + (f" ({str(error).splitlines()[0]})" if error else "")
            if node is not None:
                gaps.append((node, why))
        del converted, loaded
    return gaps


_ONNX2TORCH_REGISTRY = """
import json, sys
sys.path.insert(0, sys.argv[1])
import _litert_convert
_litert_convert._torchvision_or_stand_in()
from onnx2torch.node_converters import registry
print(json.dumps(sorted([d.domain, d.operation_type, d.version] for d in registry._CONVERTER_REGISTRY)))
"""


@functools.lru_cache(maxsize=1)
def onnx2torch_registry() -> tuple[tuple[str, str, int], ...] | None:
    """onnx2torch's converters as (domain, op, version), read in the LiteRT converter environment
    (cached per environment under $EDGESMITH_HOME/cache), or None when that environment is missing."""
    from edgesmith.runtime.keys import edgesmith_home
    from edgesmith.toolchain import tools

    python = tools.tool_python("litert")
    if python is None:
        return None
    pins = "-".join(p.replace("==", "") for p in tools.TOOLS["litert"] if p.startswith("onnx2torch"))
    cache = edgesmith_home() / "cache" / f"onnx2torch-registry-{pins}.json"
    try:
        return tuple(tuple(e) for e in json.loads(cache.read_text()))
    except (OSError, ValueError):
        pass
    backends = Path(__file__).with_name("backends")
    result = subprocess.run([str(python), "-c", _ONNX2TORCH_REGISTRY, str(backends)], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        return None
    entries = json.loads(result.stdout.strip().splitlines()[-1])
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(entries))
    except OSError:
        pass
    return tuple(tuple(e) for e in entries)


def _tflite(model, graph_nodes: list[Node]) -> list[tuple[Node, str]]:
    from edgesmith.toolchain import tools

    registry = onnx2torch_registry()
    version = next(p.split("==")[1] for p in tools.TOOLS["litert"] if p.startswith("onnx2torch"))
    gaps = []
    for n in graph_nodes:
        # the tflite backend's converter falls back to the newest older converter of the operator
        if not any(d == n.domain and op == n.op and v <= n.since for d, op, v in registry):
            gaps.append((n, f"onnx2torch {version} has no converter for it (the tflite backend's ONNX route)"))
    return gaps


def _installed(backend: str) -> str | None:
    """Why the backend's table cannot be read here, or None."""
    from edgesmith.toolchain.backends import get_backend
    from edgesmith.toolchain.errors import UserError

    try:
        get_backend(backend).version()
    except UserError as e:
        return str(e)
    if backend == "tflite" and onnx2torch_registry() is None:
        return "onnx2torch's converter registry could not be read in the LiteRT converter environment"
    return None


TABLES = {"ort": _ort, "openvino": _openvino, "tvm": _tvm, "tflite": _tflite}


# ------------------------------------------------------------------ learnt conditions

@functools.lru_cache(maxsize=1)
def _learnt() -> dict[tuple[str, str], list[dict]]:
    """The conditions file's cases by (operator, domain)."""
    try:
        cases = json.loads(CONDITIONS.read_text())["cases"]
    except (OSError, ValueError, KeyError):
        cases = []
    by_op: dict[tuple[str, str], list[dict]] = {}
    for c in cases:
        by_op.setdefault((c["op"], c.get("domain", "")), []).append(c)
    return by_op


def learnt_conditions(backend: str, op: str, domain: str) -> list[dict]:
    """What the conformance runner learnt about ``op`` on ``backend``: a list of conditions, each
    ``{"when": {feature key: text}, "cases": [...], "reason": ...}`` (``when`` empty: refused in
    every conformance case of the operator)."""
    records = [c for c in _learnt().get((op, domain), []) if backend in c["results"]]
    passed = [c for c in records if c["results"][backend]["outcome"] == "correct"]
    failed = [c for c in records if c["results"][backend]["outcome"] in ("refused", "wrong")]
    seen_in_passing = set().union(*(c["features"] for c in passed)) if passed else set()
    conditions: dict[tuple, dict] = {}
    for c in failed:
        if passed:
            when = {k: v for k, v in c["features"].items() if k not in seen_in_passing}
            if not when:
                continue  # the same features passed elsewhere: nothing to say about this node
        else:
            when = {k: v for k, v in c["features"].items() if k.startswith("nonconst:")}
        result = c["results"][backend]
        key = (tuple(sorted(when)), result["outcome"], result.get("reason", ""))
        entry = conditions.setdefault(key, {"when": when, "outcome": result["outcome"],
                                            "reason": result.get("reason", ""), "cases": [], "all_failed": not passed})
        entry["cases"].append(c["case"])
    return list(conditions.values())


def _learnt_gaps(backend: str, graph_nodes: list[Node]) -> list[tuple[Node, str]]:
    gaps = []
    for n in graph_nodes:
        have = features(n)
        for condition in learnt_conditions(backend, n.op, n.domain):
            if all(k in have for k in condition["when"]):
                cases = condition["cases"]
                named = ", ".join(cases[:2]) + (f" and {len(cases) - 2} more" if len(cases) > 2 else "")
                verb = "refused" if condition["outcome"] == "refused" else "built wrong"
                if condition["when"]:
                    when = " and ".join(condition["when"].values())
                    scope = "every conformance case of it, all with that" if condition["all_failed"] else "conformance case(s) with that"
                    why = f"when {when}: {verb} in {scope} ({named})"
                else:
                    why = f"{verb} in every conformance case of it ({named})"
                if condition["reason"]:  # the compiler's own words, without edgesmith's framing
                    why += f": {condition['reason'].split('; ')[0].rsplit(': ', 1)[-1]}"
                gaps.append((n, why))
                break
    return gaps


# ------------------------------------------------------------------ the check

def check_backend(model, backend: str, graph_nodes: list[Node] | None = None) -> BackendCoverage:
    """What ``backend`` cannot compile in ``model`` (an onnx.ModelProto): its table's gaps, then the
    learnt conditions of the operators its table covers. One entry per operator (and reason)."""
    graph_nodes = graph_nodes if graph_nodes is not None else nodes(model)
    missing = _installed(backend)
    if missing:
        return BackendCoverage(backend, checked=False, note=missing)
    found = TABLES[backend](model, graph_nodes)
    table_ops = {(n.op, n.domain) for n, _ in found}
    found += [(n, why) for n, why in _learnt_gaps(backend, graph_nodes) if (n.op, n.domain) not in table_ops]
    gaps, seen = [], set()
    for n, why in found:
        source = "frontend" if (n.op, n.domain) in table_ops else "conformance"
        gap = Gap(backend, n.op, n.domain, n.opset, why, source)
        if (gap.op, gap.domain, gap.why) not in seen:
            seen.add((gap.op, gap.domain, gap.why))
            gaps.append(gap)
    return BackendCoverage(backend, checked=True, gaps=gaps)


def check(model, backends: list[str]) -> list[BackendCoverage]:
    graph_nodes = nodes(model)
    return [check_backend(model, b, graph_nodes) for b in backends]


def nobody_supports(model, target_name: str, backends: list[str]) -> str | None:
    """One sentence when some operator of ``model`` is one that every backend tried lacks (the
    backends not installed here aside), else None."""
    report = [c for c in check(model, backends) if c.checked]
    if not report:
        return None
    common = set.intersection(*({(g.op, g.domain) for g in c.gaps} for c in report))
    if not common:
        return None
    gaps = [g for g in report[0].gaps if (g.op, g.domain) in common]
    ops = ", ".join(dict.fromkeys(g.operator for g in gaps))
    return (f"operator {ops} is supported by none of the backends tried for {target_name} "
            f"({', '.join(c.backend for c in report)}); `edgesmith check MODEL -t {target_name}` lists what each lacks: "
            "replace the operator in the model, or export it with operators these backends have")

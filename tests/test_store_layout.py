"""The central side's layout: toolchain/deploy uses toolchain/fleet (its broker, protocol and store),
never the reverse, and the store (toolchain/fleet/store/) imports only the fleet's leaf modules.
Read from the source (every import statement, also those inside functions), so a lazy import that
closes the cycle counts too."""

from __future__ import annotations

import ast
from pathlib import Path

TOOLCHAIN = Path(__file__).resolve().parent.parent / "toolchain"
PACKAGE = "edgesmith.toolchain"
# What the store may import from the rest of toolchain/fleet: the contract's wire types and the
# sequence bookkeeping, which import nothing of the fleet's processes (monitor, view, broker).
STORE_MAY_IMPORT = {"fleet.protocol", "fleet.sequence", "fleet.budget"}  # leaf modules: they import no fleet module


def _is_module(name: str) -> bool:
    if not name.startswith(f"{PACKAGE}."):
        return False
    path = TOOLCHAIN.joinpath(*name.removeprefix(f"{PACKAGE}.").split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """The edgesmith.toolchain modules (and packages) a source file imports, as 'fleet.store.engine'."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from edgesmith.toolchain.fleet import broker` imports the module edgesmith.toolchain.fleet.broker
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names
                                    if _is_module(f"{node.module}.{alias.name}"))]
        else:
            continue
        found.update(n.removeprefix(f"{PACKAGE}.") for n in names if n.startswith(f"{PACKAGE}."))
    return found


def _graph(*packages: str) -> dict[str, set[str]]:
    graph = {}
    for package in packages:
        for path in sorted((TOOLCHAIN / package).rglob("*.py")):
            module = ".".join(path.relative_to(TOOLCHAIN).with_suffix("").parts).removesuffix(".__init__")
            graph[module] = _imports(path)
    return graph


def _top(module: str) -> str:
    return module.split(".")[0]


def test_the_graph_sees_the_imports_that_exist():
    graph = _graph("fleet", "deploy")
    assert "fleet.store.deployments" in graph["deploy.rollout"]
    assert "fleet.broker" in graph["deploy.rollout"]
    assert "fleet.store.deployments" in graph["fleet.status"]
    assert "fleet.store.deployments" in graph["fleet.monitor"]  # an import inside a method


def test_fleet_does_not_import_deploy():
    graph = _graph("fleet", "deploy")
    wrong = {module: sorted(i for i in imports if _top(i) == "deploy")
             for module, imports in graph.items() if _top(module) == "fleet"}
    wrong = {module: imports for module, imports in wrong.items() if imports}
    assert not wrong, (f"toolchain/fleet imports toolchain/deploy, which imports toolchain/fleet: {wrong}; put what "
                       "both need in toolchain/fleet/store (deployments.py), or pass it in from the CLI")


def test_the_store_imports_only_the_fleets_leaf_modules():
    graph = _graph("fleet")
    wrong = {module: sorted(i for i in imports if _top(i) in ("fleet", "deploy") and not i.startswith("fleet.store")
                            and i not in STORE_MAY_IMPORT and i != "fleet")
             for module, imports in graph.items() if module.startswith("fleet.store")}
    wrong = {module: imports for module, imports in wrong.items() if imports}
    assert not wrong, f"the store imports fleet/deploy modules beyond {sorted(STORE_MAY_IMPORT)}: {wrong}"


def test_the_cli_gives_the_monitor_the_artifact_index():
    """The monitor labels digests from the artifact store through the index the CLI passes in."""
    assert "deploy.archive" in _imports(TOOLCHAIN / "cli" / "fleet.py")

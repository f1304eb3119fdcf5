"""The package is layered along the data flow, and no module imports upward or in a cycle.

Every ``import`` in every module counts, including imports inside functions (deferring an import hides a
dependency, it does not remove it). A module may import its own layer only within its own package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {
    "sovpack": ROOT / "sovpack",
    "sovpack.converters": ROOT / "converters",
    "sovpack.targets": ROOT / "targets",
    "sovpack.schemas": ROOT / "schemas",
}

# Lowest first. A module is placed by its longest matching prefix.
LAYERS: dict[str, int] = {
    "sovpack.errors": 0,
    "sovpack._io": 1,
    "sovpack._plugins": 1,
    "sovpack._schemas": 1,
    "sovpack.schemas": 1,
    "sovpack._digests": 2,  # artifact digests: hashed while written or in the background (uses _io)
    "sovpack._protocols": 2,
    "sovpack.source": 3,  # reading a checkpoint: safetensors, config, tokenizer, the canonical spec
    "sovpack.attest": 4,  # statements name source files
    "sovpack.converters": 4,  # families: HF config -> canonical spec
    "sovpack.source.model": 5,  # opening a model picks its family
    "sovpack.oci": 5,
    "sovpack.rope": 4,  # rotary frequencies from the spec: the reference and the graph builders
    "sovpack.reference": 6,
    "sovpack.artifact": 6,
    "sovpack.encoder_reference": 7,  # the encoder reference reuses the decoder reference's numerics
    "sovpack.parity": 8,
    "sovpack.quantize": 8,  # calibration runs the reference; the targets use the codes
    "sovpack.targets": 9,
    "sovpack.convert": 10,
    "sovpack.transport": 10,
    "sovpack.bundle": 11,
    "sovpack.verify": 11,
    "sovpack.bundle.assemble": 12,  # these read signed bundles as inputs: each is verified first
    "sovpack.bundle.earlier": 12,
    "sovpack.bundle.publish": 12,
    "sovpack.run": 12,
    "sovpack.inspection": 12,
    "sovpack.cli": 13,
    "sovpack.__main__": 14,
}
# The root package only carries the version string; anyone may read it.
ROOT_MODULE = "sovpack"


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in directory.rglob("*.py"):
            rel = path.relative_to(directory).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "sovpack" and parts and parts[0] in ("converters", "targets", "schemas"):
                continue
            found[name] = path
    return found


def _layer(module: str) -> tuple[int, str]:
    """(layer, package): the package is the first two name components (sovpack.source, sovpack.targets ...)."""
    if module == ROOT_MODULE:
        return 0, ROOT_MODULE
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} has no layer in tests/test_layering.py: place it")
    return LAYERS[best], ".".join(module.split(".")[:2])


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {  # `if TYPE_CHECKING:` imports are annotations only, not a runtime dependency
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for stmt in node.body
        for child in ast.walk(stmt)
    }
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("sovpack"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("sovpack"):
            names.add(node.module)
            for alias in node.names:  # `from sovpack.attest import oms` imports the module sovpack.attest.oms
                names.add(f"{node.module}.{alias.name}")
    return {n for n in names if n != module}


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_imports(module: str) -> None:
    level, home = _layer(module)
    for imported in sorted(_imports(MODULES[module], module)):
        if imported == ROOT_MODULE or imported not in MODULES:
            continue  # the version string, or a name imported from a module (checked via the module itself)
        other_level, other_home = _layer(imported)
        assert other_level <= level, f"{module} (layer {level}) imports {imported} (layer {other_level})"
        if other_level == level:
            assert other_home == home, f"{module} imports {imported}: same layer, different package"


def test_no_import_cycles_between_modules() -> None:
    graph = {m: {i for i in _imports(p, m) if i in MODULES and i != ROOT_MODULE} for m, p in MODULES.items()}
    # A package __init__ re-exporting its submodules is not a cycle of behaviour: drop package -> child edges.
    for m in graph:
        graph[m] = {i for i in graph[m] if not i.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt):], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_every_module_is_small() -> None:
    """No module over ~500 lines: a bigger one is doing several jobs (data tables are the exception)."""
    tables = {"sovpack.parity.prompts"}
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > 520}
    assert not {m: n for m, n in big.items() if m not in tables}, big

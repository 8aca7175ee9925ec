"""The package layering: every import of a module under ``src/lowbit`` points down (or inside its own package),
never sideways between packages of one layer, and no ``_private`` name crosses a package boundary.

Read statically (``ast``), function-level imports included, so a lazy import cannot hide a climb back up.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "lowbit"

# Lowest first. A package may import from its own package and from any package of a lower layer.
LAYERS: list[tuple[str, ...]] = [
    ("device", "progress"),  # where a job runs, how far it is: import nothing of lowbit
    ("core", "data", "outdir", "zoo"),  # leaves: they import nothing of lowbit but device
    ("observers",),
    ("nn",),
    ("transforms",),
    ("export",),
    ("ptq", "qat"),
    ("analysis",),
    ("search",),
    ("report", "provenance"),
    ("jobs",),
    ("serve",),
    ("cli",),
]
LAYER_OF = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
FACADE = "lowbit"  # src/lowbit/__init__.py re-exports the public API: it may import anything; nothing imports it

# (importing file, imported module, why): none today; an entry needs a reason a reviewer accepts.
ALLOWED: set[tuple[str, str]] = set()


def _package_of(rel: Path) -> str:
    return rel.parts[0].removesuffix(".py") if rel.parts else FACADE


def _imports(tree: ast.AST) -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` of every absolute ``lowbit`` import (``from lowbit import x`` → ``lowbit.x``)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "lowbit"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "lowbit":
            if node.module == "lowbit":
                for a in node.names:
                    out.append((node.lineno, f"lowbit.{a.name}", []))
            else:
                out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def _modules() -> list[tuple[Path, ast.AST]]:
    return [(f.relative_to(SRC), ast.parse(f.read_text(), str(f))) for f in sorted(SRC.rglob("*.py"))]


def _target_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FACADE


def test_every_package_has_a_layer():
    packages = {_package_of(rel) for rel, _ in _modules() if rel != Path("__init__.py")}
    assert packages == set(LAYER_OF), f"place these in LAYERS: {sorted(packages ^ set(LAYER_OF))}"


def test_imports_point_down_only():
    bad = []
    for rel, tree in _modules():
        if rel == Path("__init__.py"):
            continue
        own = _package_of(rel)
        for line, module, _ in _imports(tree):
            target = _target_package(module)
            if target == own or (str(rel), module) in ALLOWED:
                continue
            if target == FACADE:
                bad.append(f"{rel}:{line} imports the lowbit facade ({module})")
            elif target not in LAYER_OF:
                continue  # a public name re-exported by the facade (``from lowbit import Recipe``) is caught above
            elif LAYER_OF[target] == LAYER_OF[own]:
                bad.append(f"{rel}:{line} imports sideways {module} ({own} and {target} share a layer)")
            elif LAYER_OF[target] > LAYER_OF[own]:
                bad.append(f"{rel}:{line} climbs up to {module} ({own} is below {target})")
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_a_package():
    bad = []
    for rel, tree in _modules():
        own = _package_of(rel)
        for line, module, names in _imports(tree):
            if _target_package(module) == own:
                continue
            bad += [f"{rel}:{line} imports {module}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
            if any(part.startswith("_") and not part.startswith("__") for part in module.split(".")):
                bad.append(f"{rel}:{line} imports private module {module}")
    assert not bad, "\n".join(bad)


def test_no_private_attribute_of_another_package():
    """``module._name`` on a module imported from another package (``from lowbit.x import y; y._z``)."""
    bad = []
    for rel, tree in _modules():
        own = _package_of(rel)
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "lowbit":
                aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
            elif isinstance(node, ast.Import):
                aliases.update({a.asname or a.name.split(".")[0]: a.name for a in node.names
                                if a.name.split(".")[0] == "lowbit"})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and _target_package(aliases[node.value.id]) != own):
                bad.append(f"{rel}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


# (file, line text): writes to a module's __dict__ outside lowbit.nn that are not a class handling its own instance
DICT_ALLOWED = {
    ("transforms/lift.py", "new.__dict__ = mod.__dict__.copy()"),  # a shallow copy of any float module, not nn state
}


def test_only_nn_touches_module_dicts():
    """Engine links and export tensors belong to lowbit.nn (``engine_emulation``, ``export_form``): outside nn
    only ``self.__dict__`` (a class of that package handling its own instance) is allowed."""
    bad = []
    for rel, tree in _modules():
        if _package_of(rel) == "nn":
            continue
        lines = (SRC / rel).read_text().splitlines()
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == "__dict__"
                    and not (isinstance(node.value, ast.Name) and node.value.id == "self")
                    and (str(rel), lines[node.lineno - 1].strip()) not in DICT_ALLOWED):
                bad.append(f"{rel}:{node.lineno} {lines[node.lineno - 1].strip()}")
    assert not bad, "\n".join(bad)

"""The floors point one way: models <- shards <- harness <- launch.

Each package is imported whole (every module pkgutil finds) in a fresh interpreter, and what it
pulled in is read from sys.modules: `models` may load nothing from shards, harness or launch,
`shards` nothing from harness or launch, `harness` nothing from launch. An import inside a function
escapes that probe until the function runs, so the source is also read: no such import either, and
inside `models` no module imports one that imports it back.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ["models", "shards", "harness", "launch"]  # each may import only those before it

PROBE = """
import importlib, json, pkgutil, sys
pkg = importlib.import_module({package!r})
for info in pkgutil.walk_packages(pkg.__path__, {package!r} + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted(n for n in sys.modules if n.split(".")[0] in {floors!r})))
"""


@pytest.mark.parametrize("package", FLOORS[:3])
def test_a_package_imports_nothing_from_the_floors_above_it(package):
    code = PROBE.format(package=package, floors=FLOORS)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    loaded = json.loads(r.stdout.splitlines()[-1])
    above = FLOORS[FLOORS.index(package) + 1 :]
    assert any(n.startswith(f"{package}.") for n in loaded)  # the probe really imported the package
    wrong = [n for n in loaded if n.split(".")[0] in above]
    assert not wrong, f"{package} imports from a floor above it: {', '.join(wrong)}"


def _imports(path: Path, package: str | None = None) -> set[str]:
    """Modules (of `package`, if given) that the file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from models import layerspec`
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {n for n in found if package is None or n.split(".")[0] == package}


@pytest.mark.parametrize("package", FLOORS[:3])
def test_no_import_from_a_floor_above_even_inside_a_function(package):
    above = FLOORS[FLOORS.index(package) + 1 :]
    wrong = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in sorted(_imports(path))
        if name.split(".")[0] in above
    ]
    assert not wrong, "; ".join(wrong)


def test_models_has_no_import_circle():
    modules = {f"models.{p.stem}": p for p in (ROOT / "models").glob("*.py") if p.stem != "__init__"}
    graph = {name: _imports(path, "models") & set(modules) for name, path in modules.items()}

    def circle(start, node, seen):
        for nxt in graph[node]:
            if nxt == start:
                return [*seen, nxt]
            if nxt not in seen:
                found = circle(start, nxt, [*seen, nxt])
                if found:
                    return found
        return None

    for name in sorted(graph):
        found = circle(name, name, [name])
        assert not found, f"import circle: {' -> '.join(found)}"

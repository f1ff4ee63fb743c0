"""The package as a whole: what importing it costs, and how its modules depend on each other."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "optimum_msp"


def test_import_loads_no_trainer_plotting_or_evaluate_machinery():
    code = ("import sys, optimum_msp; heavy = ('transformers.trainer', 'transformers.training_args', 'matplotlib', "
            "'evaluate'); print(sorted(m for m in sys.modules if m.startswith(heavy)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
    # and the Trainer callback is still where users find it
    code = "import optimum_msp; print(optimum_msp.SparsityPreservingCallback.__name__)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "SparsityPreservingCallback"


def _imports(path: Path) -> set:
    """The package modules ``path`` imports (at any depth of the file: a lazy import is still a dependency)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("optimum_msp"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("optimum_msp"))
    return found


def test_the_package_has_no_import_circles():
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    graph = {name: {target for target in _imports(path) if target in files and target != name}
             for name, path in files.items()}
    # a package's __init__ re-exporting its own modules is its face, not a dependency between rooms
    graph = {name: {t for t in targets if not (files[name].name == "__init__.py" and t.startswith(name + "."))}
             for name, targets in graph.items()}
    for name in graph:  # a module that imports its own parent package's __init__ imports its siblings
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state, cycle = {}, []

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycle.extend(stack[stack.index(target):] + [target])
                return True
            if target not in state and visit(target, stack + [target]):
                return True
        state[node] = "done"
        return False

    for name in sorted(graph):
        if name not in state and visit(name, [name]):
            break
    assert not cycle, " -> ".join(cycle)

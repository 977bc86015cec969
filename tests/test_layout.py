"""The package's layout as a property: wings import only from themselves and the wings below them, nothing forms
an import cycle, imports of the package's own modules sit at module level, and no code outside the model
profiles branches on a model's name."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The data path, bottom to top: a module may import from its own wing and the wings before it.
WINGS = ("engine", "methods", "evaluation", "worlds", "studio", "cli")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path, package: str) -> list[tuple[str, bool]]:
    """(imported module of `package`, imported inside a function?) for every import in the file."""
    name = module_name(path, root)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text("utf-8"))
    in_function = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(fn)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = name.split(".") if is_package else name.split(".")[:-1]
            target = node.module or ""
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            if target.split(".")[0] != package:
                continue
            for alias in node.names:  # `from package.wing import module` imports that module
                sub = f"{target}.{alias.name}"
                is_module = (root / (sub.replace(".", "/") + ".py")).exists() or (root / sub.replace(".", "/")).is_dir()
                found.append((sub if is_module else target, id(node) in in_function))
        elif isinstance(node, ast.Import):
            found += [(alias.name, id(node) in in_function) for alias in node.names
                      if alias.name.split(".")[0] == package]
    return found


def wing(module: str) -> int:
    """The wing's rank; the package root (its public API, `python -m`) sits above every wing."""
    parts = module.split(".")
    return WINGS.index(parts[1]) if len(parts) > 1 and parts[1] in WINGS else len(WINGS)


def layout_problems(root: Path, package: str = "erasure") -> list[str]:
    """Upward imports, function-level imports of the package's own modules, and import cycles."""
    problems, graph = [], {}
    for path in sorted((root / package).rglob("*.py")):
        module = module_name(path, root)
        graph[module] = set()
        for target, in_function in imported_modules(path, root, package):
            if target == package or target == module:
                continue
            graph[module].add(target)
            if wing(target) > wing(module):
                problems.append(f"{module} imports {target} from a wing above it")
            if in_function:
                problems.append(f"{module} imports {target} inside a function")
    # A cycle: a module reachable from itself (packages count as their __init__).
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                problems.append("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt in graph and not state.get(nxt):
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [node])
    return problems


def test_wings_import_downward_only_at_module_level_and_without_cycles():
    assert layout_problems(ROOT) == []


def test_the_layout_check_fails_on_a_cycle_and_on_an_upward_import(tmp_path):
    package = tmp_path / "pkg"
    for folder in ("engine", "studio"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "engine" / "a.py").write_text("from pkg.engine.b import x\n")
    (package / "engine" / "b.py").write_text("from pkg.engine import a\nx = 1\n")
    (package / "engine" / "c.py").write_text("def f():\n    from pkg.studio.d import y\n")
    (package / "studio" / "d.py").write_text("y = 2\n")
    problems = layout_problems(tmp_path, "pkg")
    assert "import cycle: pkg.engine.a -> pkg.engine.b -> pkg.engine.a" in problems
    assert "pkg.engine.c imports pkg.studio.d from a wing above it" in problems
    assert "pkg.engine.c imports pkg.studio.d inside a function" in problems


NAME_BRANCH = re.compile(r"model_id\s*[=!]=|model_id in |in RANDOM_MODELS|== TOY_MODEL|model\s*==\s*\"(?:toy|tiny)|"
                         r"in \(\"tiny\", \"toy\"\)")


@pytest.mark.parametrize("source", ["app.py", *[str(p.relative_to(ROOT)) for p in sorted((ROOT / "erasure").rglob("*.py"))
                                               if "worlds" not in p.parts]])  # worlds define their profiles
def test_no_code_branches_on_a_models_name(source):
    """What a model is comes from its profile (erasure/engine/profiles.py and the worlds that register one)."""
    lines = [f"{i}: {line.strip()}" for i, line in enumerate((ROOT / source).read_text("utf-8").splitlines(), 1)
             if NAME_BRANCH.search(line)]
    assert lines == []


def test_the_app_is_thin():
    lines = (ROOT / "app.py").read_text("utf-8").splitlines()
    assert len(lines) <= 550
    tree = ast.parse("\n".join(lines))
    handlers = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Studio")
    long = {fn.name: fn.end_lineno - fn.lineno + 1 for fn in handlers.body
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.end_lineno - fn.lineno + 1 > 16}
    assert long == {}  # each handler: page values in, one studio call, updates out

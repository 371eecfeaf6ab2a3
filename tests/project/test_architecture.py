"""The house rules of prefixlm/, checked on the source: imports only run downward through the
layers (import-linter's contracts in pyproject.toml, and no circle inside a package), no function
over 80 lines, no private name used across modules.

There is no cap on a module's length: modules are split by concept, not by line count (a cap
split modules by count and kept old import paths alive by re-exports; issue 23)."""

import ast
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "prefixlm"


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p))
            for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """prefixlm modules imported anywhere in ``tree`` (module level and inside functions)."""
    package = name if name in known and (PACKAGE / "/".join(name.split(".")[1:]) / "__init__.py"
                                         ).exists() else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("prefixlm"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if not base.startswith("prefixlm"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


def _graph():
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, tree, known) for name, tree in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules forming an import circle, or None (iterative DFS, three colours)."""
    colour = dict.fromkeys(graph, 0)
    for root in graph:
        if colour[root]:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[child] == 1:
                return path[path.index(child):] + [child]
            elif colour[child] == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle_inside_prefixlm():
    cycle = find_cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def _lint_imports(root: pathlib.Path) -> subprocess.CompletedProcess:
    """import-linter's contracts (pyproject.toml [tool.importlinter]) on the tree under ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import "
                           "lint_imports_command; sys.exit(lint_imports_command())"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_imports_run_only_downward_through_the_layers():
    """The layers contract (commands > compile | study > evaluation > train > run > config >
    data | objectives | model > vocab > core), train never importing evaluation or study, and the
    study never importing JAX, all checked by import-linter over every import, lazy ones too."""
    out = _lint_imports(ROOT)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 kept, 0 broken" in out.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "prefixlm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    errors = tmp_path / "prefixlm" / "core" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _upward():\n    from prefixlm.train import loop\n")
    out = _lint_imports(tmp_path)
    assert out.returncode != 0 and "BROKEN" in out.stdout
    assert "prefixlm.core.errors -> prefixlm.train.loop" in out.stdout, out.stdout


def _private_uses(tree: ast.Module, aliases: dict[str, str]):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            yield f"{aliases[node.value.id]}.{node.attr}"


def _prefixlm_aliases(tree: ast.Module) -> dict[str, str]:
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prefixlm"):
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("prefixlm") and a.asname:
                    aliases[a.asname] = a.name
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prefixlm"):
            for a in node.names:
                if a.name.startswith("_"):
                    aliases.setdefault("<from-import>", f"{node.module}.{a.name}")
    return aliases


def test_no_private_name_is_used_across_modules():
    """Neither prefixlm/ nor bench/ reaches into another module's private names."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = _prefixlm_aliases(tree)
        if "<from-import>" in aliases:
            offenders.append(f"{path.name}: from-import of {aliases.pop('<from-import>')}")
        offenders += [f"{path.name}: {u}" for u in _private_uses(tree, aliases)]
    assert not offenders, offenders


MAX_FUNCTION_LINES = 80


def long_functions(tree: ast.Module, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(qualified name, lines) of every function or method in ``tree`` longer than ``limit``
    lines, decorators and docstring included (nested functions count on their own and inside
    their parent)."""
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                n = child.end_lineno - first + 1
                if n > limit:
                    out.append((prefix + child.name, n))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def test_the_long_function_finder_finds_a_planted_one():
    def function(name, n_lines, indent=""):  # n_lines in all: the def, body, the return
        body = "".join(f"{indent}    x{i} = {i}\n" for i in range(n_lines - 2))
        return f"{indent}def {name}():\n{body}{indent}    return 0\n"

    source = (function("fits", 80) + "\n\nclass A:\n    @staticmethod\n"
              + function("long", 82, "    ") + "\n\ndef outer():\n"
              + function("inner", 81, "    ") + "    return inner\n")
    assert long_functions(ast.parse(source)) == [("A.long", 83), ("outer", 83),
                                                 ("outer.inner", 81)]


def test_no_function_is_over_80_lines():
    long = {f"{_module_name(p)}.{name}": n for p in sorted(PACKAGE.rglob("*.py"))
            for name, n in long_functions(ast.parse(p.read_text()))}
    assert not long, f"split these functions (over {MAX_FUNCTION_LINES} lines): {long}"

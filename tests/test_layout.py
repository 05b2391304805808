"""The package's shape: no import cycles among its modules, every returned type exported, long modules
say why they are long, docstrings cite definitions rather than tracker numbers."""
from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import repforget_kernels

PACKAGE = Path(repforget_kernels.__file__).resolve().parent
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set:
    """Package modules ``name`` imports anywhere in its source (function-level imports included)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {t for t in [target] + [f"{target}.{a.name}" for a in node.names] if t in MODULES}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES}
    # a package importing its own submodules (its __init__) is how a package is assembled, not a cycle
    return {t for t in found if t != name and not t.startswith(name + ".")}


def _cycles(graph: dict) -> list:
    state, stack, found = {}, [], []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return found


class TestImports:
    def test_the_kernel_library_has_no_import_cycle(self):
        library = {n: p for n, p in MODULES.items() if not n.startswith("repforget_kernels.driver")}
        graph = {n: _imports(n, p) & set(library) for n, p in library.items()}
        assert _cycles(graph) == []

    def test_the_cycle_finder_sees_a_lazy_cycle(self):
        assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b", "a"]]


class TestExports:
    @pytest.mark.parametrize("name", repforget_kernels.__all__)
    def test_every_returned_public_type_is_exported(self, name):
        obj = getattr(repforget_kernels, name)
        if not callable(obj):
            return
        hints = inspect.signature(obj).return_annotation if not inspect.isclass(obj) else None
        returned = re.findall(r"\b([A-Z]\w+)\b", str(hints)) if hints else []
        scope = vars(inspect.getmodule(obj))
        ours = [t for t in returned if getattr(scope.get(t), "__module__", "").startswith("repforget_kernels")]
        for type_name in ours:
            assert type_name in repforget_kernels.__all__, f"{name} returns {type_name}, not in __all__"

    def test_fisher_histogram_type(self):
        assert "FisherHistogram" in repforget_kernels.__all__


class TestModuleText:
    @pytest.mark.parametrize("name", sorted(MODULES))
    def test_long_modules_say_why(self, name):
        text = MODULES[name].read_text()
        if text.count("\n") > MAX_LINES:
            doc = ast.get_docstring(ast.parse(text)) or ""
            assert "Length:" in doc, f"{name} has {text.count(chr(10))} lines and no 'Length:' reason in its docstring"

    @pytest.mark.parametrize("name", sorted(MODULES))
    def test_docstrings_cite_no_issue_numbers(self, name):
        tree = ast.parse(MODULES[name].read_text())
        docs = [ast.get_docstring(n) or "" for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        assert not [d for d in docs if re.search(r"\bissue\s*#?\d+", d, re.I)]

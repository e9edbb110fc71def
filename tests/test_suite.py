"""The suite's own rule, read from the test files' source (ast): a test that starts a process
(``subprocess``, ``Popen``, ``multiprocessing``: the command line, a Streamlit server, torchrun)
or drives the browser (playwright) carries the ``slow`` mark, a browser test ``browser`` too, so
that ``python -m pytest -m "not slow"`` stays the fast path. A test counts as starting one when
it does so itself, or through a helper function or a fixture it uses (in its module, conftest.py
or a module it imports them from), or through an autouse fixture of its module."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
#: Names whose use starts a process, and those that drive the browser.
STARTS = {"subprocess", "Popen", "multiprocessing"}
BROWSER = {"playwright", "sync_playwright"}

Function = ast.FunctionDef | ast.AsyncFunctionDef


def _marks(node: ast.AST) -> set[str]:
    """The ``pytest.mark.NAME`` marks used anywhere in ``node`` (decorators, ``pytestmark``)."""
    marks = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Attribute) and sub.value.attr == "mark":
            marks.add(sub.attr)
    return marks


def _fixture_name(fn: Function) -> str | None:
    """The name a ``@pytest.fixture`` registers ``fn`` under (its ``name=`` or its own), else None."""
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Attribute) and target.attr == "fixture":
            names = [k.value.value for k in getattr(dec, "keywords", []) if k.arg == "name"]
            return names[0] if names else fn.name
    return None


def _is_autouse(fn: Function) -> bool:
    return any(isinstance(dec, ast.Call) and any(k.arg == "autouse" and getattr(k.value, "value", False)
                                                  for k in dec.keywords) for dec in fn.decorator_list)


class Suite:
    """The test folder's modules, their functions, fixtures and imports of each other."""

    def __init__(self, folder: Path) -> None:
        self.trees = {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(folder.glob("*.py"))}
        self.functions = {m: {n.name: n for n in t.body if isinstance(n, Function)} for m, t in self.trees.items()}
        self.fixtures = {m: {name: f for f in fns.values() if (name := _fixture_name(f))}
                         for m, fns in self.functions.items()}
        self.imports = {m: self._imports(t) for m, t in self.trees.items()}
        self._known: dict[tuple[str, str, frozenset], list[str] | None] = {}

    def _imports(self, tree: ast.Module) -> dict[str, tuple[str, str]]:
        """Local name -> (module, name) of what a module imports from the other test modules."""
        out = {}
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module in self.trees:
                for alias in node.names:
                    out[alias.asname or alias.name] = (node.module, alias.name)
        return out

    def _resolve(self, module: str, name: str) -> tuple[str, Function] | None:
        """The helper function ``name`` refers to in ``module`` (fixtures are not called by name)."""
        if name in self.functions[module]:
            fn = self.functions[module][name]
            return None if _fixture_name(fn) else (module, fn)
        if name in self.imports[module]:
            source, real = self.imports[module][name]
            return self._resolve(source, real) if source != module else None
        return None

    def _fixture(self, module: str, name: str) -> tuple[str, Function] | None:
        if name in self.fixtures[module]:
            return module, self.fixtures[module][name]
        for source, real in self.imports[module].values():
            fn = self.functions[source].get(real)
            if fn is not None and _fixture_name(fn) == name:
                return source, fn
        if "conftest" in self.fixtures and name in self.fixtures["conftest"]:
            return "conftest", self.fixtures["conftest"][name]
        return None

    def uses(self, module: str, fn: Function, names: frozenset, seen: frozenset = frozenset()) -> list[str] | None:
        """The chain (fixtures and helpers, then the name) through which ``fn`` uses one of
        ``names``, or None."""
        key = (module, fn.name, names)
        if key in self._known:
            return self._known[key]
        if (module, fn.name) in seen:
            return None
        seen = seen | {(module, fn.name)}
        body = [node for stmt in fn.body for node in ast.walk(stmt)]  # not the annotations
        chain = None
        for node in body:
            used = set()
            if isinstance(node, ast.Name):
                used = {node.id}
            elif isinstance(node, ast.Attribute):
                used = {node.attr}
            elif isinstance(node, ast.alias | ast.ImportFrom):
                dotted = node.name if isinstance(node, ast.alias) else (node.module or "")
                used = set(dotted.split("."))
            if used & names:
                chain = [sorted(used & names)[0]]
                break
        callees = [n.id for n in body if isinstance(n, ast.Name) and n.id != fn.name]
        for name in callees if chain is None else ():
            found = self._resolve(module, name)
            if found and (sub := self.uses(*found, names, seen)) is not None:
                chain = [name, *sub]
                break
        for arg in fn.args.args if chain is None else ():
            found = self._fixture(module, arg.arg)
            if found and (sub := self.uses(*found, names, seen)) is not None:
                chain = [f"fixture {arg.arg}", *sub]
                break
        if chain is not None or not seen - {(module, fn.name)}:  # a "no" cut short by a cycle is not kept
            self._known[key] = chain
        return chain

    def tests(self):
        """(module, test function, its marks with its class's and module's) of every test."""
        for module, tree in self.trees.items():
            if not module.startswith("test_"):
                continue
            module_marks = set().union(*(_marks(n) for n in tree.body if isinstance(n, ast.Assign)
                                         and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)))
            for node in tree.body:
                if isinstance(node, Function) and node.name.startswith("test_"):
                    yield module, node, module_marks | _marks(ast.Module(node.decorator_list, []))
                elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                    class_marks = module_marks | _marks(ast.Module(node.decorator_list, []))
                    for fn in node.body:
                        if isinstance(fn, Function) and fn.name.startswith("test_"):
                            yield module, fn, class_marks | _marks(ast.Module(fn.decorator_list, []))

    def chain(self, module: str, fn: Function, names: frozenset) -> list[str] | None:
        """How the test ``fn`` uses ``names``: itself, its fixtures, or an autouse fixture of its module."""
        found = self.uses(module, fn, names)
        for auto in (f for f in self.fixtures[module].values() if _is_autouse(f)):
            if found is None and (sub := self.uses(module, auto, names)) is not None:
                found = [f"autouse fixture {auto.name}", *sub]
        return found

    def unmarked(self) -> list[str]:
        """One line for each test that starts a process or drives the browser without its marks."""
        problems = []
        for module, fn, marks in self.tests():
            for names, needed in ((frozenset(BROWSER), {"slow", "browser"}), (frozenset(STARTS), {"slow"})):
                if (chain := self.chain(module, fn, names)) is not None:
                    if missing := needed - marks:
                        problems.append(f"{module}.py::{fn.name} uses {' -> '.join(chain)} but is not marked "
                                        f"{', '.join(sorted(missing))}")
                    break
        return sorted(problems)


def test_every_process_and_browser_test_is_marked_slow() -> None:
    assert Suite(TESTS).unmarked() == []


def test_the_check_finds_an_unmarked_test_through_a_fixture_and_a_helper(tmp_path) -> None:
    (tmp_path / "conftest.py").write_text(
        "import pytest\n\n\n@pytest.fixture\ndef server():\n    from playwright.sync_api import sync_playwright\n"
        "    return sync_playwright\n")
    (tmp_path / "_helpers.py").write_text("import subprocess\n\n\ndef run(*args):\n    return subprocess.run(args)\n")
    (tmp_path / "test_x.py").write_text(
        "import pytest\nfrom _helpers import run\n\n\ndef _twice():\n    return run('a'), run('b')\n\n\n"
        "def test_plain():\n    assert 1\n\n\ndef test_via_helper():\n    _twice()\n\n\n"
        "@pytest.mark.slow\ndef test_marked():\n    _twice()\n\n\n"
        "@pytest.mark.slow\ndef test_browser_needs_its_mark(server):\n    assert server\n")
    assert Suite(tmp_path).unmarked() == [
        "test_x.py::test_browser_needs_its_mark uses fixture server -> playwright but is not marked browser",
        "test_x.py::test_via_helper uses _twice -> run -> subprocess but is not marked slow",
    ]

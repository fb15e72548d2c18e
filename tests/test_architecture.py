"""The layout rules of ``docs/architecture.md``, checked on the package's source read as text.

The package is never imported here: its files are parsed with :mod:`ast`, and this file has its own small
walker (it does not use ``scripts/import_graph.py``, so that the two check each other).  The rules:

* every module lies in a layer: a subpackage in :data:`LAYERS`, or ``cli.py`` / ``__init__.py`` at the top;
* no import cycle, counting imports inside functions too;
* no module imports from a layer above its own (inside functions too);
* no private name (``_x``) is imported from another module;
* an import inside a function takes a third-party dependency of :data:`LAZY` (optional, or heavy to import),
  or a module of the package with a ``# reason`` comment on the statement's line(s); nothing else;
* ``jobs/*.py`` import, of the project, only ``lemmse_ray.cli`` (and their ``_path`` helper);
* every package and subpackage has a docstring.

A failure lists every offending line.  The last test plants one violation of each rule in a small package
written to a temporary folder and checks that each rule finds it.
"""
from __future__ import annotations

import ast
import functools
import io
import itertools
import tokenize
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lemmse_ray"
JOBS = REPO / "jobs"

# Bottom to top; a module may import from its own layer and the layers below it.
LAYERS = ("core", "kernels", "bank", "storage", "cluster", "data", "models", "runs", "studies", "cli")
TOP_MODULES = ("__init__", "cli")  # the package's own top-level modules, on the top layer

# Third-party packages that may be imported inside a function, and why:
LAZY = {
    "triton": "optional (the `triton` extra); only where a CUDA or interpreted Triton kernel runs",
    "matplotlib": "heavy; only where a figure is drawn",
    "ray": "heavy; with its submodules (ray.train, ray.util, ...), in modules that must work without Ray",
    "skimage": "heavy; only to cut the embedded `photos` and `faces` datasets",
    "sklearn": "heavy; only to load the embedded `digits` dataset",
    "s3fs": "optional (the `s3` extra); only for s3:// paths",
}
PRAGMAS = ("noqa", "type:", "pragma", "isort:", "fmt:")  # tool directives, not reasons


@dataclass(frozen=True)
class Edge:
    """One module (or outside package) named by one import statement."""

    file: str        # the importing file, from the folder that holds the package: lemmse_ray/cli.py
    module: str      # its dotted name
    line: int
    target: str      # a module of the package, or the top-level name of an outside package
    internal: bool
    names: tuple     # the names of ``from X import a, b``; () for ``import X``
    in_function: bool
    reason: str      # the comment on the statement's line(s), tool directives left out
    text: str

    def where(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


def dotted(path: Path, package: Path) -> str:
    parts = (package.name, *path.relative_to(package).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def line_comments(source: str) -> dict[int, str]:
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if text and not text.lower().startswith(PRAGMAS):
                out[tok.start[0]] = text
    return out


class Walker(ast.NodeVisitor):
    """Collects the import statements of one file, knowing whether each lies inside a function."""

    def __init__(self, file: str, module: str, is_package: bool, modules: set, root: str, source: str):
        self.file, self.module, self.modules, self.root = file, module, modules, root
        self.here = module.split(".") if is_package else module.split(".")[:-1]
        self.lines = source.splitlines()
        self.comments = line_comments(source)
        self.depth = 0
        self.edges: list[Edge] = []

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def _edge(self, node, target, internal, names):
        span = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        reason = " ".join(self.comments[k] for k in span if k in self.comments)
        text = " ".join(" ".join(self.lines[k - 1] for k in span).split()).replace("( ", "(").replace(", )", ")")
        self.edges.append(Edge(self.file, self.module, node.lineno, target, internal, tuple(names),
                               self.depth > 0, reason, text))

    def _known(self, name):
        """``name`` if it is a module of the package, else the nearest enclosing one."""
        while name and name not in self.modules:
            name = name.rpartition(".")[0]
        return name

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name.split(".")[0] == self.root:
                self._edge(node, self._known(alias.name) or alias.name, True, ())
            else:
                self._edge(node, alias.name.split(".")[0], False, ())

    def visit_ImportFrom(self, node):
        if node.level:
            base = self.here[: len(self.here) - node.level + 1] + ([node.module] if node.module else [])
            base = ".".join(base)
        else:
            base = node.module
        if base.split(".")[0] != self.root:
            self._edge(node, base.split(".")[0], False, [a.name for a in node.names])
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._edge(node, sub if sub in self.modules else (self._known(base) or base), True, [alias.name])


@functools.cache
def package_edges(package: Path) -> tuple[Edge, ...]:
    files = sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    modules = {dotted(p, package) for p in files}
    edges = []
    for path in files:
        source = path.read_text(encoding="utf-8")
        file = path.relative_to(package.parent).as_posix()
        walker = Walker(file, dotted(path, package), path.name == "__init__.py", modules, package.name, source)
        walker.visit(ast.parse(source))
        edges += walker.edges
    return tuple(edges)


def layers(package: Path, order=LAYERS, top=TOP_MODULES) -> tuple[dict[str, str], list[str]]:
    """Each module's layer, and the modules that lie in none."""
    found, astray = {}, []
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(package).parts
        module = dotted(path, package)
        if len(rel) == 1:
            found[module] = order[-1]
            if path.stem not in top:
                astray.append(f"{module}: a top-level module other than {', '.join(t + '.py' for t in top)}")
        else:
            found[module] = rel[0]
            if rel[0] not in order:
                astray.append(f"{module}: subpackage {rel[0]!r} is not in the layer order {' < '.join(order)}")
    return found, astray


# ---- the rules, each a function of a package folder returning its offending lines ----------------------------
def cycles(package: Path) -> list[str]:
    graph: dict[str, dict[str, Edge]] = {}
    for e in package_edges(package):
        graph.setdefault(e.module, {})
        if e.internal and e.target != e.module:
            graph[e.module].setdefault(e.target, e)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    found = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, {})):
            if state.get(t) == 1:
                loop = path[path.index(t):] + [t]
                found.append(" -> ".join(loop) + "\n    " + "\n    ".join(
                    graph[a][b].where() for a, b in itertools.pairwise(loop)))
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def upward_imports(package: Path, order=LAYERS, top=TOP_MODULES) -> list[str]:
    layer, _ = layers(package, order, top)  # a module in no layer: test_every_module_lies_in_a_layer
    rank = {name: k for k, name in enumerate(order)}
    out = {}
    for e in package_edges(package):
        if e.internal and rank.get(layer.get(e.target), -1) > rank.get(layer[e.module], len(order)):
            above = layer[e.target] + (" (the package's __init__)" if e.target == package.name else "")
            out[f"{e.where()}  ({layer[e.module]} imports from {above})"] = None
    return list(out)  # one line per statement


def private_imports(package: Path) -> list[str]:
    return [f"{e.where()}  ({name} from {e.target})" for e in package_edges(package) if e.internal
            for name in (e.names or (e.target.rpartition(".")[2],))
            if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))]


def function_imports(package: Path, lazy=LAZY) -> list[str]:
    out = {}
    for e in package_edges(package):
        if not e.in_function:
            continue
        if e.internal and not e.reason:
            out[f"{e.where()}  (a package module imported inside a function without a # reason comment)"] = None
        elif not e.internal and e.target not in lazy:
            out[f"{e.where()}  ({e.target} is not an optional or heavy dependency: import it at the top)"] = None
    return list(out)  # one line per statement


def job_imports(jobs: Path, package_name: str = "lemmse_ray") -> list[str]:
    out = []
    helpers = {p.stem for p in jobs.glob("*.py")}
    for path in sorted(jobs.glob("*.py")):
        if path.stem == "_path":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        seen = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module == package_name:
                names = [f"{package_name}.{a.name}" for a in node.names]  # from lemmse_ray import cli
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or "."]  # from lemmse_ray.cli import main: the module lemmse_ray.cli
            else:
                continue
            for name in names:
                first = name.split(".")[0]
                if first == package_name:
                    seen.append(name)
                    if name != f"{package_name}.cli":
                        out.append(f"jobs/{path.name}:{node.lineno}: imports {name} (only {package_name}.cli)")
                elif first in helpers and first != "_path":
                    out.append(f"jobs/{path.name}:{node.lineno}: imports jobs/{first}.py (only _path)")
        if f"{package_name}.cli" not in seen:
            out.append(f"jobs/{path.name}: does not import {package_name}.cli (a job is a thin entry point)")
    return out


def missing_docstrings(package: Path) -> list[str]:
    """Folders of modules without an ``__init__.py``, and ``__init__.py`` files without a docstring."""
    folders = sorted({p.parent for p in package.rglob("*.py") if "__pycache__" not in p.parts})
    out = []
    for folder in folders:
        init = folder / "__init__.py"
        where = init.relative_to(package.parent).as_posix()
        if not init.is_file():
            out.append(f"{where}: missing (a folder of modules is a subpackage)")
        elif not (ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or "").strip():
            out.append(f"{where}: no docstring")
    return out


def report(offences: list[str], rule: str) -> str:
    return f"{len(offences)} {rule}:\n" + "\n".join(offences)


# ---- the package --------------------------------------------------------------------------------------------
def test_every_module_lies_in_a_layer():
    _, astray = layers(PACKAGE)
    assert not astray, report(astray, "modules outside the layers")


def test_no_import_cycle():
    found = cycles(PACKAGE)
    assert not found, report(found, "import cycles (imports inside functions counted)")


def test_no_import_from_a_higher_layer():
    found = upward_imports(PACKAGE)
    assert not found, report(found, f"imports from a higher layer (order {' < '.join(LAYERS)})")


def test_no_private_name_imported_across_modules():
    found = private_imports(PACKAGE)
    assert not found, report(found, "private names imported from another module")


def test_imports_inside_functions_are_lazy_dependencies_or_explained():
    found = function_imports(PACKAGE)
    assert not found, report(found, "imports inside functions that break the rule")


def test_jobs_import_only_the_cli():
    found = job_imports(JOBS)
    assert not found, report(found, "job imports")


def test_every_package_has_a_docstring():
    found = missing_docstrings(PACKAGE)
    assert not found, report(found, "packages without a docstring")


# ---- the checks themselves find planted violations -------------------------------------------------------------
def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_the_checks_find_planted_violations(tmp_path):
    pkg = tmp_path / "pkg"
    write(pkg, {
        "__init__.py": '"""Top."""\nfrom .core.a import f\n',
        "cli.py": "from .runs import b\n",
        "extra.py": "",                                                   # a top-level module in no layer
        "core/__init__.py": '"""Core."""\n',
        "core/a.py": "def f():\n    from ..runs import b\n    import json\n"   # upward, unexplained, stdlib
                     "    from .c import g  # the reason\n    import triton\n",
        "core/c.py": "from . import d\ndef g():\n    pass\n",              # c <-> d: a cycle
        "core/d.py": "from .c import g\n",
        "runs/__init__.py": "",                                          # no docstring
        "runs/b.py": "from ..core.d import _hidden\nfrom ..core import c\n",  # private name
        "odd/__init__.py": '"""Not in the order."""\n',
        "odd/e.py": "",
        "loose/f.py": "",                                                # a folder without __init__.py
    })
    order, top = ("core", "runs", "cli"), ("__init__", "cli")

    found = cycles(pkg)
    assert len(found) == 1 and found[0].startswith("pkg.core.c -> pkg.core.d -> pkg.core.c"), found
    assert "pkg/core/c.py:1: from . import d" in found[0] and "pkg/core/d.py:1: from .c import g" in found[0], found

    _, astray = layers(pkg, order, top)
    assert astray == ["pkg.extra: a top-level module other than __init__.py, cli.py",
                      "pkg.loose.f: subpackage 'loose' is not in the layer order core < runs < cli",
                      "pkg.odd: subpackage 'odd' is not in the layer order core < runs < cli",
                      "pkg.odd.e: subpackage 'odd' is not in the layer order core < runs < cli"], astray
    found = upward_imports(pkg, order, top)
    assert found == ["pkg/core/a.py:2: from ..runs import b  (core imports from runs)"], found

    assert private_imports(pkg) == ["pkg/runs/b.py:1: from ..core.d import _hidden  (_hidden from pkg.core.d)"]

    found = function_imports(pkg)
    assert found == [
        "pkg/core/a.py:2: from ..runs import b  (a package module imported inside a function without a # reason comment)",
        "pkg/core/a.py:3: import json  (json is not an optional or heavy dependency: import it at the top)",
    ], found

    assert missing_docstrings(pkg) == ["pkg/loose/__init__.py: missing (a folder of modules is a subpackage)",
                                       "pkg/runs/__init__.py: no docstring"]

    jobs = tmp_path / "jobs"
    write(jobs, {"_path.py": "import sys\n",
                 "good.py": "import sys\nimport _path  # noqa: F401\nimport ray\nfrom lemmse_ray.cli import main\n",
                 "deep.py": "import _path\nfrom lemmse_ray.cli import main\nfrom lemmse_ray.runs import config\n",
                 "sibling.py": "from lemmse_ray import cli\nimport good\n",
                 "bare.py": "import sys\n"})
    assert job_imports(jobs) == [
        "jobs/bare.py: does not import lemmse_ray.cli (a job is a thin entry point)",
        "jobs/deep.py:3: imports lemmse_ray.runs (only lemmse_ray.cli)",
        "jobs/sibling.py:2: imports jobs/good.py (only _path)",
    ]

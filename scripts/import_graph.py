#!/usr/bin/env python
"""The import graph of a Python package, read as text (nothing is imported): standard library only.

It prints, for the package folder given (default: this repository's ``lemmse_ray/``):

* the modules, each with its layer (the subpackage it lies in; modules at the package's top level, such as
  ``cli.py`` and ``__init__.py``, take the top layer) and its floor (1 + the highest floor among the package
  modules it imports at module level; a module that imports none of them is on floor 1);
* the number of floors (the longest chain of module-level imports) and one such chain;
* the cycles: strongly connected components of the module-level import graph, then of the graph that also
  counts the imports inside functions;
* the imports from a higher layer, given a layer order (``--layers``);
* private names (``_name``) imported from another module of the package;
* every import inside a function, with the comment on its line(s) (its stated reason).

A package without subpackages (a flat layout) has no layers: that part of the report is left out.

Relative imports resolve to the module they name: ``from . import x`` and ``from ..core import problems``
give ``pkg.sub.x`` and ``pkg.core.problems`` when those are modules, otherwise the module or package the
name is taken from.  Importing ``pkg.sub.mod`` also runs ``pkg/__init__.py`` and ``pkg/sub/__init__.py``;
those implicit edges are not counted.

    python scripts/import_graph.py                      # this repository's lemmse_ray/
    python scripts/import_graph.py path/to/package --layers "core kernels bank"
"""
from __future__ import annotations

import argparse
import ast
import io
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PACKAGE = Path(__file__).resolve().parents[1] / "lemmse_ray"
DEFAULT_LAYERS = "core kernels bank storage cluster data models runs studies cli"


@dataclass(frozen=True)
class Import:
    """One imported name (or module) of one import statement."""

    module: str          # the importing module
    line: int
    end_line: int
    target: str          # the package module it resolves to, or the top-level name of an outside module
    internal: bool       # target is a module of the package
    names: tuple[str, ...]  # the names taken by ``from X import a, b`` (empty for ``import X``)
    in_function: bool
    text: str            # the statement on one line


def module_name(path: Path, root: Path) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def comments(source: str) -> dict[int, str]:
    """The comment of each line (without its ``#``), from the tokenizer: a ``#`` inside a string is none."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = token.string[1:].strip()
    return found


class Package:
    """The modules of one package folder and their imports."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.name = self.root.name
        self.files = {module_name(p, self.root): p for p in sorted(self.root.rglob("*.py"))
                      if "__pycache__" not in p.parts}
        self.packages = {module_name(p, self.root) for p in self.files.values() if p.name == "__init__.py"}
        self.sources = {m: p.read_text(encoding="utf-8") for m, p in self.files.items()}
        self.comments = {m: comments(s) for m, s in self.sources.items()}
        self.imports = [i for m in self.files for i in self._imports(m)]

    def _resolve(self, name: str) -> str | None:
        """The longest prefix of ``name`` that is a module of the package."""
        parts = name.split(".")
        while parts:
            if ".".join(parts) in self.files:
                return ".".join(parts)
            parts.pop()
        return None

    def _imports(self, module: str):
        source = self.sources[module]
        tree = ast.parse(source, filename=str(self.files[module]))
        package = module if module in self.packages else module.rpartition(".")[0]

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    yield from self._statement(module, package, child, in_function, source)
                yield from visit(child, inner)

        yield from visit(tree, False)

    def _statement(self, module, package, node, in_function, source):
        text = " ".join((ast.get_source_segment(source, node) or "").split())
        text = text.replace("( ", "(").replace(" )", ")").replace(",)", ")")
        common = {"module": module, "line": node.lineno, "end_line": node.end_lineno or node.lineno,
                  "in_function": in_function, "text": text}
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = self._resolve(alias.name) if alias.name.split(".")[0] == self.name else None
                yield Import(target=target or alias.name.split(".")[0], internal=target is not None, names=(),
                             **common)
            return
        if node.level:
            base = package.split(".")
            if node.level > 1:
                base = base[: len(base) - (node.level - 1)]
            base = ".".join(base + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base.split(".")[0] != self.name:
            yield Import(target=base.split(".")[0], internal=False, names=tuple(a.name for a in node.names),
                         **common)
            return
        # ``from pkg.sub import mod`` imports the module pkg.sub.mod; ``from pkg.sub.mod import name`` a name of it
        by_target: dict[str, list[str]] = {}
        for alias in node.names:
            target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in self.files else self._resolve(base)
            by_target.setdefault(target or base, []).append(alias.name)
        for target, names in by_target.items():
            yield Import(target=target, internal=target in self.files, names=tuple(names), **common)

    # ---- the graph -------------------------------------------------------------------------------------------
    def graph(self, with_functions: bool) -> dict[str, set[str]]:
        edges: dict[str, set[str]] = {m: set() for m in self.files}
        for i in self.imports:
            if i.internal and i.target != i.module and (with_functions or not i.in_function):
                edges[i.module].add(i.target)
        return edges

    def layer(self, module: str, order: list[str]) -> str:
        parts = module.split(".")
        # a subpackage's modules (and its __init__) are its layer; top-level modules are on the top layer
        if len(parts) > 2 or (len(parts) == 2 and module in self.packages):
            return parts[1]
        return order[-1]


def components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative), each sorted; in reverse topological order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                found.append(sorted(component))
    return found


def floors(edges: dict[str, set[str]]) -> tuple[dict[str, int], list[str]]:
    """Each module's floor (a cycle counts as one floor) and one longest chain, top first."""
    floor: dict[str, int] = {}
    below: dict[str, str | None] = {}
    member = {}
    comps = components(edges)
    for k, comp in enumerate(comps):
        for m in comp:
            member[m] = k
    for comp in comps:  # reverse topological order: what a component imports is already done
        outside = [t for m in comp for t in edges[m] if t not in comp]
        best = max(outside, key=lambda t: (floor[t], t), default=None)
        for m in comp:
            floor[m] = 1 + (floor[best] if best else 0)
            below[m] = best
    top = max(floor, key=lambda m: (floor[m], m))
    chain = [top]
    while below[chain[-1]]:
        chain.append(below[chain[-1]])
    return floor, chain


def report(root: Path, order: list[str]) -> str:
    pkg = Package(root)
    out: list[str] = []
    say = out.append
    layered = len(pkg.packages) > 1
    module_edges = pkg.graph(with_functions=False)
    all_edges = pkg.graph(with_functions=True)
    floor, chain = floors(module_edges)
    floor_all, chain_all = floors(all_edges)

    say(f"package {pkg.name}: {len(pkg.files)} modules ({len(pkg.packages)} of them __init__.py)"
        + (f" in {len(pkg.packages) - 1} subpackages" if layered else ", no subpackages (no layers)"))
    say("")
    say("== modules" + (" by layer (floor: module-level imports)" if layered else " (floor: module-level imports)"))
    if layered:
        layers = {m: pkg.layer(m, order) for m in pkg.files}
        unknown = sorted({layer for layer in layers.values() if layer not in order})
        for name in order + unknown:
            members = sorted(m for m in pkg.files if layers[m] == name)
            if members:
                label = name + ("  (not in the layer order)" if name in unknown else "")
                say(f"{label}:")
                for m in members:
                    say(f"  {floor[m]:3d}  {m}")
    else:
        for m in sorted(pkg.files):
            say(f"  {floor[m]:3d}  {m}")
    say("")
    say(f"== floors: {max(floor.values())} (module-level imports); {max(floor_all.values())} counting the "
        f"imports inside functions")
    say("longest chain (each imports the next): " + " -> ".join(chain))
    if max(floor_all.values()) > max(floor.values()):
        say("with imports inside functions: " + " -> ".join(chain_all))
    say("")
    for title, edges in (("module-level imports", module_edges), ("counting imports inside functions", all_edges)):
        cycles = [c for c in components(edges) if len(c) > 1 or c[0] in edges[c[0]]]
        say(f"== cycles ({title}): {len(cycles)}")
        for c in sorted(cycles):
            say("  " + " <-> ".join(c))
            for i in pkg.imports:
                if i.internal and i.module in c and i.target in c and i.target != i.module \
                        and (title.startswith("counting") or not i.in_function):
                    say(f"      {i.module}:{i.line}: {i.text}")
    say("")
    if layered:
        rank = {name: k for k, name in enumerate(order)}
        upward = [i for i in pkg.imports if i.internal
                  and rank.get(pkg.layer(i.target, order), -1) > rank.get(pkg.layer(i.module, order), len(order))]
        say(f"== imports from a higher layer (order: {' < '.join(order)}): {len(upward)}")
        for i in upward:
            where = " (in a function)" if i.in_function else ""
            say(f"  {i.module} [{pkg.layer(i.module, order)}] -> {i.target} [{pkg.layer(i.target, order)}]"
                f"{where}")
            say(f"      {i.module}:{i.line}: {i.text}")
        say("")
    private = [(i, n) for i in pkg.imports if i.internal for n in i.names
               if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
    private += [(i, i.target.rpartition(".")[2]) for i in pkg.imports if i.internal and not i.names
                and i.target.rpartition(".")[2].startswith("_")]
    say(f"== private names imported across modules: {len(private)}")
    for i, name in private:
        say(f"  {i.module} imports {name} from {i.target}")
        say(f"      {i.module}:{i.line}: {i.text}")
    say("")
    statements = {}
    for i in pkg.imports:
        if i.in_function:
            statements.setdefault((i.module, i.line), []).append(i)
    inner = sorted(statements.items())
    n_internal = sum(any(i.internal for i in group) for _, group in inner)
    n_reason = sum(1 for (module, _), group in inner
                   if any(pkg.comments[module].get(line) for line in range(group[0].line, group[0].end_line + 1)))
    say(f"== imports inside functions: {len(inner)} statements, {n_internal} of package modules, "
        f"{n_reason} with a comment")
    current = None
    for (module, line), group in inner:
        if module != current:
            say(f"{module}:")
            current = module
        i = group[0]
        reason = next((pkg.comments[module][k] for k in range(i.line, i.end_line + 1)
                       if pkg.comments[module].get(k)), "")
        kind = "package" if any(g.internal for g in group) else (
            "stdlib" if i.target in sys.stdlib_module_names else "third-party")
        say(f"  {line:4d}  [{kind}] {i.text}")
        say(f"        # {reason}" if reason else "        (no comment)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", nargs="?", type=Path, default=DEFAULT_PACKAGE,
                        help="the package folder (default: this repository's lemmse_ray/)")
    parser.add_argument("--layers", default=DEFAULT_LAYERS,
                        help="the subpackages from bottom to top, separated by spaces; the last one is also the "
                             "layer of the package's top-level modules (default: %(default)r)")
    args = parser.parse_args(argv)
    if not (args.package / "__init__.py").is_file():
        parser.error(f"{args.package} is not a package folder (no __init__.py)")
    print(report(args.package, args.layers.split()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

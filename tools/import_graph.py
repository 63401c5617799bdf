"""Print nexlm's import graph and check it: no cycles, transports only on the facade and encoders.

    python tools/import_graph.py          # the graph, one module per line, then the checks
    python tools/import_graph.py --dot    # Graphviz instead

Reads the source (``ast``), imports nothing. Only imports that run at import time
count: those under ``if TYPE_CHECKING:`` and those inside functions (lazy, on
purpose) are listed apart. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nexlm"
# What a transport may import from nexlm directly: the facade, the wire encoders, and the
# small shared vocabulary (keys, who a request comes from, refusals, JSON from clients).
# The stateless doors (/v1) use the same kinds of things: their facade (gateway), their encoder
# (openai_wire) and their refusals in OpenAI's envelope (openai_errors).
TRANSPORT_MAY_USE = {
    "nexlm.appkeys", "nexlm.clients", "nexlm.conversations", "nexlm.events", "nexlm.wire", "nexlm.validation",
    "nexlm.gateway", "nexlm.openai_wire", "nexlm.openai_errors",
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level:
        base = current.split(".") if is_package else current.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{a.name}" for a in node.names]  # a name, or (walked up) the module holding it


def imports(path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(imports at import time, lazy or type-checking-only imports) of one module, within nexlm."""
    name = module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    eager, lazy = set(), set()

    def visit(node: ast.AST, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            d = deferred
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                d = True
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                d = True
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                targets = _resolve(name, path.name == "__init__.py", child)
            for t in targets:
                while t and t not in known:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    (lazy if d else eager).add(t)
            visit(child, d)

    visit(tree, False)
    return eager, lazy - eager


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(f) for f in files}
    eager, lazy = {}, {}
    for f in files:
        eager[module_name(f)], lazy[module_name(f)] = imports(f, known)
    return eager, lazy


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def problems(eager: dict[str, set[str]]) -> list[str]:
    found = [f"import cycle: {' -> '.join(c)}" for c in cycles(eager)]
    for mod, deps in sorted(eager.items()):
        if mod.startswith("nexlm.transports.") and mod != "nexlm.transports":
            for d in sorted(deps):
                if not d.startswith("nexlm.transports") and d not in TRANSPORT_MAY_USE:
                    found.append(f"{mod} imports {d}: transports talk to the facade and the encoders only")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dot", action="store_true", help="print Graphviz dot")
    args = p.parse_args(argv)
    eager, lazy = graph()
    if args.dot:
        print("digraph nexlm {")
        for mod, deps in sorted(eager.items()):
            for d in sorted(deps):
                print(f'  "{mod}" -> "{d}";')
        print("}")
    else:
        for mod in sorted(eager):
            line = f"{mod} -> {', '.join(sorted(eager[mod])) or '(nothing)'}"
            if lazy[mod]:
                line += f"   [lazy: {', '.join(sorted(lazy[mod]))}]"
            print(line)
    found = problems(eager)
    for f in found:
        print("FAIL:", f, file=sys.stderr)
    if not found and not args.dot:
        print(f"\n{len(eager)} modules, no import cycles; transports use only the facade and the encoders.")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

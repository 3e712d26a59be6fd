"""The package face: the public API is exactly __all__, the demo is not imported, no module
imports another in a cycle, and nothing points at files outside the repository."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import fisheradaptune

from helpers import REPO_ROOT

# The package as imported (the source tree, or an installed wheel) and the repository's files
# (README, csrc/, tests/, ...), which an installed wheel does not carry.
PKG = pathlib.Path(fisheradaptune.__file__).parent
ROOT = REPO_ROOT


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _executed(tree):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _imports(path: pathlib.Path, name: str):
    """Every fisheradaptune module ``path`` imports, at any depth (functions included)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in _executed(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("fisheradaptune"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("fisheradaptune"):
                continue
            out.add(mod)
            for a in node.names:  # `from . import ops` imports the module fisheradaptune.ops
                out.add(f"{mod}.{a.name}")
    return out


def _graph():
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for dep in _imports(path, name):
            # Importing a.b.c runs a and a.b first; keep only real modules.
            parts = dep.split(".")
            for k in range(1, len(parts) + 1):
                d = ".".join(parts[:k])
                if d in modules:
                    deps.add(d)
        # A module's own ancestors are always being imported when it runs: not an edge.
        graph[name] = {d for d in deps if not (name == d or name.startswith(d + "."))}
    return graph


def _find_cycle(graph):
    """A cycle of ``graph`` (module -> imported modules) as a list, or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None
    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = _graph()
    assert "fisheradaptune.adaptune.optimizer" in graph  # the walk sees the subpackages
    assert "fisheradaptune.distributed.comm" in graph["fisheradaptune.fisher.kfac"]
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_can_fail(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from .b import g\n")  # a lazy import counts too
    assert _imports(a, "fisheradaptune.a") >= {"fisheradaptune.b"}
    assert _find_cycle({"x": {"y"}, "y": {"z"}, "z": {"x"}}) == ["x", "y", "z", "x"]
    assert _find_cycle({"x": {"y"}, "y": set()}) is None


def test_public_api_is_exactly_all():
    # In a fresh interpreter: other tests import submodules (the demo), which then show up as
    # attributes of the package here.
    code = ("import fisheradaptune as f; "
            "public = {n for n in dir(f) if not n.startswith('_')}; "
            "want = {n for n in f.__all__ if not n.startswith('_')}; "
            "assert public == want, (public ^ want); "
            "assert all(hasattr(f, n) for n in f.__all__)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_does_not_import_the_demo():
    code = ("import sys, fisheradaptune; "
            "bad = [m for m in sys.modules if m.startswith('fisheradaptune.demo')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_pointer_outside_the_repository():
    offenders = []
    # The package, the C++ sources, and everything a reader of the repository opens next to
    # them: tests, benchmarks, examples, tools and the docs.
    files = list((ROOT / "fisheradaptune").rglob("*.py")) + list((ROOT / "csrc").rglob("*.*"))
    for folder in ("tests", "benchmarks", "examples", "tools", "docs"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".sh")]
    files.append(ROOT / "README.md")
    for path in files:
        if path.name == "test_package.py":
            continue  # this test names the words it looks for
        text = path.read_text(errors="replace")
        for word in ("SPEC.md", "DESIGN.md", "SPEC section", "../shared"):
            if word in text:
                offenders.append(f"{path.relative_to(ROOT)}: {word}")
    assert not offenders, offenders


def test_ops_exports_the_typed_wrappers_of_every_family():
    from fisheradaptune import ops
    families = {"fisher": ["fisher_accumulate_", "per_sample_grad_sq_"],
                "drift": ["js_drift", "js_mass_totals", "js_mass_partial"],
                "tokens": ["token_prune_merge", "bipartite_merge"], "sparse": ["sampled_grad"]}
    assert sorted(ops.__all__) == sorted(n for names in families.values() for n in names)
    for family, names in families.items():
        for name in names:
            assert getattr(ops, name).__module__ == f"fisheradaptune.ops.{family}", name


def _design_map_paths():
    """The paths the README's design map names: the first word of each line of the code block
    under "## Design"; indented entries are under the last unindented folder; ``a.{h,cpp}``
    expands."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Design", 1)[1].split("```", 2)[1]
    paths, parent = [], ""
    for line in block.splitlines():
        if not line.strip() or line.startswith(" " * 8):
            continue  # blank, or the continuation of a description
        word = line.split()[0]
        indented = line.startswith("  ")
        if not indented:
            parent = word if word.endswith("/") else ""
        path = (parent + word) if indented else word
        head, brace, rest = path.partition("{")
        if brace:
            options, tail = rest.split("}", 1)
            paths += [head + option + tail for option in options.split(",")]
        else:
            paths.append(path)
    return paths


def test_the_readme_design_map_names_paths_that_exist():
    paths = _design_map_paths()
    assert len(paths) > 20, paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, missing

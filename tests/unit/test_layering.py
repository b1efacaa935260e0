"""The package's imports against the layer table in docs/architecture.md: no cycle, no import against
the order, none of the imports the table forbids. The table lives in the docs, so the picture there
cannot drift from the code. Also: the public API (`from leanserve import LLM, SamplingParams`)
without torch on `import leanserve`.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "leanserve"
DOC = ROOT / "docs" / "architecture.md"
LAZY = "__init__:lazy"  # the package root's __getattr__: imports made on first use of leanserve.LLM etc.


# ---- the import graph --------------------------------------------------------------------------


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """'leanserve/serve/api.py' -> 'serve.api'; 'leanserve/__init__.py' -> '__init__' (the root)."""
    names = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[tuple[ast.stmt, bool]]:
    """Every import statement, module level or not, with whether it sits in the root's __getattr__;
    imports under ``if TYPE_CHECKING:`` are left out (they never run)."""
    found: list[tuple[ast.stmt, bool]] = []

    def walk(node: ast.AST, in_getattr: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    walk(sub, in_getattr)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_getattr))
            inner = in_getattr or (isinstance(child, ast.FunctionDef) and child.name == "__getattr__"
                                   and node is tree)
            walk(child, inner)

    walk(tree, False)
    return found


def import_graph(package: Path = PACKAGE) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between the package's modules, third-party top-level names each module imports)."""
    names = module_names(package)
    internal: dict[str, set[str]] = {m: set() for m in names}
    internal[LAZY] = set()
    external: dict[str, set[str]] = {m: set() for m in internal}

    def resolve(dotted: str) -> str | None:
        """'leanserve.serve.api' -> 'serve.api'; 'leanserve' -> '__init__'; None outside the package."""
        if dotted == "leanserve":
            return "__init__"
        if not dotted.startswith("leanserve."):
            return None
        rel = dotted[len("leanserve."):]
        while rel and rel not in names:
            rel = rel.rpartition(".")[0]
        return rel or "__init__"

    for module, path in names.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package_parts = ["leanserve"] + ([] if module == "__init__" else module.split("."))
        if path.name != "__init__.py":
            package_parts = package_parts[:-1]
        for node, in_getattr in _imports(tree):
            source = LAZY if module == "__init__" and in_getattr else module
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package_parts[:len(package_parts) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                # `from leanserve import kernels` imports the module leanserve.kernels
                targets = [f"{base}.{a.name}" for a in node.names] if base.startswith("leanserve") else [base]
            for target in targets:
                rel = resolve(target)
                if rel is None:
                    external[source].add(target.split(".")[0])
                elif rel != source:
                    internal[source].add(rel)
    return internal, external


# ---- the table and the checks ------------------------------------------------------------------


@dataclass
class Layers:
    order: list[tuple[str, list[str]]]  # (layer name, entries), lowest first
    never: list[tuple[list[str], list[str]]] = field(default_factory=list)  # (entries, forbidden targets)

    def entry(self, module: str) -> str | None:
        """The entry that is the longest prefix of ``module`` (a whole dotted component at a time)."""
        best = None
        for _, entries in self.order:
            for e in entries:
                if (module == e or module.startswith(e + ".")) and (best is None or len(e) > len(best)):
                    best = e
        return best

    def rank(self, module: str) -> int | None:
        e = self.entry(module)
        return None if e is None else next(i for i, (_, entries) in enumerate(self.order) if e in entries)


def parse_layers(markdown: str) -> Layers:
    blocks = re.findall(r"```layers\n(.*?)```", markdown, re.S)
    assert len(blocks) == 1, "docs/architecture.md needs exactly one ```layers block"
    layers = Layers(order=[])
    for raw in blocks[0].splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        head, _, rest = line.partition(":")
        if head.startswith("never "):
            layers.never.append((head.split()[1:], rest.split()))
        else:
            layers.order.append((head.strip(), rest.split()))
    return layers


def check(internal: dict[str, set[str]], external: dict[str, set[str]], layers: Layers) -> list[str]:
    """Every problem, one line each: an unplaced module, an upward import, a forbidden import, a cycle."""
    problems = []
    for module in sorted(internal):
        if layers.rank(module) is None:
            problems.append(f"{module}: in no layer of docs/architecture.md")
    for module, targets in sorted(internal.items()):
        src = layers.rank(module)
        for target in sorted(targets):
            dst = layers.rank(target)
            if src is not None and dst is not None and dst > src:
                problems.append(f"{module} ({layers.order[src][0]}) imports {target} ({layers.order[dst][0]}), "
                                "a later layer")
    for sources, forbidden in layers.never:
        for module in sorted(internal):
            if layers.entry(module) not in sources:
                continue
            for f in forbidden:
                if f.startswith("+"):
                    if f[1:] in external.get(module, ()):
                        problems.append(f"{module} imports {f[1:]}, which its layer must not")
                    continue
                for target in sorted(internal[module]):
                    if target == f or target.startswith(f + "."):
                        problems.append(f"{module} imports {target}, which docs/architecture.md forbids ({f})")
    for cycle in cycles(internal):
        problems.append("import cycle: " + " -> ".join(cycle + [cycle[0]]))
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# ---- the tests ---------------------------------------------------------------------------------


def test_the_package_follows_the_layers_in_docs_architecture():
    internal, external = import_graph()
    problems = check(internal, external, parse_layers(DOC.read_text(encoding="utf-8")))
    assert problems == [], "\n".join(problems)


def test_every_entry_of_the_table_names_a_module():
    names = set(module_names()) | {LAZY}
    layers = parse_layers(DOC.read_text(encoding="utf-8"))
    entries = [e for _, es in layers.order for e in es] + [
        e for sources, targets in layers.never for e in sources + [t for t in targets if not t.startswith("+")]]
    stale = [e for e in entries if not any(m == e or m.startswith(e + ".") for m in names)]
    assert stale == [], f"docs/architecture.md names modules that do not exist: {stale}"


FAKE_TABLE = """
```layers
base: config types
engine: engine
api: serve bench
never bench: engine +torch
```
"""


def test_the_check_finds_a_cycle_an_upward_import_and_a_forbidden_one():
    internal = {
        "config": set(),
        "types": {"config"},
        "engine.engine": {"types", "serve.api"},  # upward
        "serve.api": {"engine.engine"},  # allowed by the order, but a cycle with the line above
        "bench.client": {"engine.engine"},  # forbidden by a never line
        "bench.stats": set(),
        "gateway": set(),  # in no layer
    }
    external = {"bench.stats": {"torch", "numpy"}}
    problems = check(internal, external, parse_layers(FAKE_TABLE))
    assert problems == [
        "gateway: in no layer of docs/architecture.md",
        "engine.engine (engine) imports serve.api (api), a later layer",
        "bench.client imports engine.engine, which docs/architecture.md forbids (engine)",
        "bench.stats imports torch, which its layer must not",
        "import cycle: engine.engine -> serve.api -> engine.engine",
    ]


def test_the_graph_sees_function_level_imports_and_skips_type_checking_ones(tmp_path):
    pkg = tmp_path / "leanserve"
    (pkg / "serve").mkdir(parents=True)
    (pkg / "__init__.py").write_text("def __getattr__(name):\n    from leanserve.serve.api import App\n")
    (pkg / "serve" / "__init__.py").write_text("")
    (pkg / "config.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from leanserve.serve.api import App\n"
        "def f():\n    import torch\n    from . import types\n")
    (pkg / "types.py").write_text("")
    (pkg / "serve" / "api.py").write_text("from leanserve import config\nfrom ..types import X\n")
    internal, external = import_graph(pkg)
    assert internal["config"] == {"types"}  # the TYPE_CHECKING import is not an edge
    assert external["config"] == {"typing", "torch"}
    assert internal["serve.api"] == {"config", "types"}
    assert internal[LAZY] == {"serve.api"} and internal["__init__"] == set()


def test_the_cli_circle_is_gone():
    internal, _ = import_graph()
    assert "cli" not in internal["serve.cli"]
    assert {"cli_common"} <= internal["serve.cli"] and {"cli_common"} <= internal["cli"]


# ---- the public API ----------------------------------------------------------------------------


def test_public_api_names_without_torch_on_import():
    code = ("import sys\nimport leanserve\n"
            "assert 'torch' not in sys.modules, 'import leanserve imported torch'\n"
            "from leanserve import SamplingParams, EngineConfig, RequestOutput\n"
            "assert 'torch' not in sys.modules, 'the plain-data names imported torch'\n"
            "from leanserve.types import SamplingParams as S\nfrom leanserve.config import EngineConfig as E\n"
            "assert SamplingParams is S and EngineConfig is E\n"
            "assert {'LLM', 'SamplingParams', 'EngineConfig'} <= set(dir(leanserve))\n"
            "from leanserve import LLM\nfrom leanserve.engine.engine import LLM as L\nassert LLM is L\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_an_unknown_name_is_an_attribute_error():
    import leanserve

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        leanserve.Nope  # noqa: B018
    with pytest.raises(ImportError):
        from leanserve import Nope  # noqa: F401

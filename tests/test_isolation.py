"""House rules: only the WebUI hosts import the WebUI's ``modules`` package; hosts never import
the UI; the trainer imports neither the UI nor the hosts (it knows the Host protocol by type only)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"lora_trainer/hosts/a1111.py", "lora_trainer/hosts/forge.py", "lora_trainer/hosts/webui.py"}


def _imports_modules(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == "modules" or a.name.startswith("modules.") for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "modules" or node.module.startswith("modules.")):
            lines.append(node.lineno)
    return lines


def test_only_hosts_import_webui_modules() -> None:
    offenders = []
    for path in (ROOT / "lora_trainer").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED:
            continue
        for line in _imports_modules(path):
            offenders.append(f"{rel}:{line}")
    assert offenders == []


def test_detector_sees_a_modules_import(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from modules import shared\n    import modules.sd_models\n")
    assert _imports_modules(f) == [2, 3]


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _package_imports(path: Path, *, runtime_only: bool) -> list[tuple[int, str]]:
    """(line, module) of every ``lora_trainer.*`` import; ``runtime_only`` skips TYPE_CHECKING blocks."""
    found = []

    def visit(node: ast.AST) -> None:
        if runtime_only and isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name.startswith("lora_trainer"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lora_trainer"):
            found.extend((node.lineno, f"{node.module}.{a.name}") for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def _offenders(package: str, forbidden: tuple[str, ...], *, runtime_only: bool, skip: set[str] = frozenset()) -> list[str]:
    out = []
    for path in (ROOT / "lora_trainer" / package).rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel in skip:
            continue
        for line, mod in _package_imports(path, runtime_only=runtime_only):
            if mod.startswith(forbidden):
                out.append(f"{rel}:{line} imports {mod}")
    return out


def test_hosts_never_import_the_ui() -> None:
    assert _offenders("hosts", ("lora_trainer.ui",), runtime_only=False) == []


def test_train_never_imports_the_ui_or_the_hosts() -> None:
    # The Host protocol may be named in annotations (TYPE_CHECKING); the train and demo commands
    # are entry points and pick the standalone host for the run.
    forbidden = ("lora_trainer.ui", "lora_trainer.hosts")
    entry_points = {"lora_trainer/train/cli.py", "lora_trainer/train/demo_run.py"}
    assert _offenders("train", forbidden, runtime_only=True, skip=entry_points) == []


def test_import_detector_sees_runtime_and_type_only_imports(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lora_trainer.hosts.base import Host\n"
                 "def f():\n    from lora_trainer.ui import jobs\n    import lora_trainer.hosts.a1111\n")
    assert _package_imports(f, runtime_only=True) == [(5, "lora_trainer.ui.jobs"), (6, "lora_trainer.hosts.a1111")]
    assert len(_package_imports(f, runtime_only=False)) == 3


# -- the package's module graph: no cycles, and the layers ---------------------------------------
# Every ``lora_trainer`` import counts, at module level or inside a function, except those under
# ``if TYPE_CHECKING:`` (they never run). ``from package import name`` is an edge to the submodule
# ``package.name`` when that file exists, else to the package.

# A family loads its parts with the models package's helpers, inside its loading methods, while the
# models package asks the family registry which family a folder or checkpoint is (and a bundle
# names its family). Both directions are the Family contract (see lora_trainer/families/base.py);
# the family side is only ever inside functions, so it never runs at import (checked below). These
# edges are left out of the cycle search; every other cycle fails.
ALLOWED_CYCLE_EDGES = (("lora_trainer.families", "lora_trainer.models"),)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_edges(path: Path, name: str, known: set[str]) -> list[tuple[int, str, bool]]:
    """(line, imported module, at import time) for each package import in ``path`` (module ``name``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(dotted: str) -> str:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted

    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child, top)
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, resolve(a.name), top) for a in node.names if a.name.startswith("lora_trainer"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.startswith("lora_trainer"):
                found.extend((node.lineno, resolve(f"{base}.{a.name}"), top) for a in node.names)
        inside = top and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(path.read_text(encoding="utf-8")), True)
    return [(line, mod, top) for line, mod, top in found if mod and mod != name]


def _package_graph(root: Path) -> dict[str, list[tuple[int, str, bool]]]:
    files = {_module_name(p, root): p for p in (root / "lora_trainer").rglob("*.py")}
    return {name: _module_edges(path, name, set(files)) for name, path in files.items()}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _cycles(graph: dict[str, list[tuple[int, str, bool]]], allowed=ALLOWED_CYCLE_EDGES) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    succ = {m: sorted({t for _, t, _ in edges if not any(_in(m, a) and _in(t, b) for a, b in allowed)})
            for m, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in succ.get(v, []):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(succ):
        if v not in index:
            connect(v)
    return found


def test_the_package_has_no_import_cycles() -> None:
    assert _cycles(_package_graph(ROOT)) == []


def test_lora_never_imports_train() -> None:
    assert _offenders("lora", ("lora_trainer.train",), runtime_only=True) == []


# LoRA-file helpers that know no family (pure functions of key names and tensors): a family's own
# file naming and inspect report build on them, so the families may import them at import time.
FAMILY_FREE_HELPERS = ("lora_trainer.lora.kohya_tensors", "lora_trainer.lora.tensor_groups")


def test_families_import_no_other_layer_at_import_time() -> None:
    # Every layer asks the families, so they import none at import time; a family may use another
    # layer's helpers inside its methods (loading with models/), as long as no cycle forms.
    layers = ("lora_trainer.train", "lora_trainer.lora", "lora_trainer.hosts", "lora_trainer.ui",
              "lora_trainer.models")
    graph = _package_graph(ROOT)
    found = [f"{m}:{line} imports {t}" for m, edges in graph.items() if _in(m, "lora_trainer.families")
             for line, t, top in edges if top and t.startswith(layers) and t not in FAMILY_FREE_HELPERS]
    assert found == []
    # ... and those helpers really know no family.
    assert [t for m in FAMILY_FREE_HELPERS for _, t, _ in graph[m] if t.startswith("lora_trainer.")
            and t != "lora_trainer.errors"] == []


def test_graph_sees_function_level_relative_and_package_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "lora_trainer"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from .b import x\n")
    (pkg / "a" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                    "    from lora_trainer.c import T\nx = 1\n")
    (pkg / "c.py").write_text("def f():\n    from lora_trainer.a import b\n")
    graph = _package_graph(tmp_path)
    assert graph["lora_trainer.a"] == [(1, "lora_trainer.a.b", True)]
    assert graph["lora_trainer.a.b"] == []  # type-only imports never run
    assert graph["lora_trainer.c"] == [(2, "lora_trainer.a.b", False)]
    assert _cycles(graph) == []
    (pkg / "a" / "b.py").write_text("def g():\n    import lora_trainer.c\n")
    assert _cycles(_package_graph(tmp_path)) == [["lora_trainer.a.b", "lora_trainer.c"]]


def test_the_config_and_the_families_import_without_torch() -> None:
    # Every module asks the families, the config among them: they must stay light to import (the
    # WebUI imports the config while it starts; the CLI's config commands need no torch).
    import subprocess
    import sys

    code = "import sys, lora_trainer.families, lora_trainer.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# Where a family's name may still be written outside lora_trainer/families, and why.
FAMILY_NAME_ALLOWED = {
    "lora_trainer/models/demo_base.py",  # declares which family the embedded demo model is
    # The benchmarks' defaults and their full-size part builder (their owner moves them to the families).
    "lora_trainer/bench/memcheck.py", "lora_trainer/bench/runner.py",
    "lora_trainer/bench/rows.py",  # the performance table's rows name the models they measure
}


def _family_name_literals(path: Path, names: set[str]) -> list[int]:
    """Lines of string literals (docstrings aside) that are a family's name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs and n.value.strip().lower() in names]


def test_only_the_families_name_a_family() -> None:
    from lora_trainer.families import family_names

    names = set(family_names())
    offenders = []
    for path in (ROOT / "lora_trainer").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if not rel.startswith("lora_trainer/families/") and rel not in FAMILY_NAME_ALLOWED:
            offenders += [f"{rel}:{line}" for line in _family_name_literals(path, names)]
    assert offenders == []


def test_family_name_detector(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text('"""sdxl in a docstring is fine."""\nif arch == "sdxl":\n    pass\nTABLE = {"sd1": 1}\n')
    assert _family_name_literals(f, {"sd1", "sdxl"}) == [2, 4]

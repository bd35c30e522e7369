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

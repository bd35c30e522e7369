"""House rule: only the WebUI hosts import the WebUI's ``modules`` package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"lora_trainer/hosts/a1111.py", "lora_trainer/hosts/forge.py"}


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

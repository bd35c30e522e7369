"""install.py's decisions: only what is missing, never a WebUI pin, nothing on a second start."""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import pytest

from lora_trainer.hosts import install_plan as ip

ROOT = Path(__file__).resolve().parents[1]

# A1111 v1.10.1's environment after its own install (pins from requirements_versions.txt).
WEBUI_ENV = {
    "torch": "2.1.2+cu121", "torchvision": "0.16.2+cu121", "xformers": "0.0.23.post1",
    "gradio": "3.41.2", "transformers": "4.30.2", "accelerate": "0.21.0", "safetensors": "0.4.2",
    "huggingface-hub": "0.36.2", "numpy": "1.26.2", "pillow": "9.5.0", "open-clip-torch": "2.20.0",
    "tokenizers": "0.13.3", "pyyaml": "6.0.1", "filelock": "3.13.1", "regex": "2023.12.25",
    "requests": "2.31.0", "fastapi": "0.94.0", "httpx": "0.24.1", "importlib-metadata": "7.0.1",
}


PYTHON = (3, 10)  # the WebUI's: its standard library has no tomllib


def lookup(env: dict[str, str]):
    return lambda name: env.get(ip.normalize(name))


def plan(env: dict[str, str], *args: object) -> list[ip.Action]:
    return ip.plan_installs(lookup(env), *args, python=PYTHON)


def test_fresh_webui_installs_diffusers_and_peft_without_deps() -> None:
    actions = plan(WEBUI_ENV)
    assert [a.spec for a in actions] == ["diffusers==0.35.2", "peft==0.13.2", "tomli==2.2.1"]
    assert all(a.args.endswith("--no-deps") for a in actions)
    ip.check_pins_untouched(actions)


def test_tomli_only_where_the_standard_library_has_no_tomllib() -> None:
    assert [a.name for a in ip.plan_installs(lookup(WEBUI_ENV), python=(3, 11))] == ["diffusers", "peft"]
    assert plan(dict(WEBUI_ENV, tomli="2.0.1"))[-1].name == "peft"  # one that is there is kept


def test_second_start_installs_nothing() -> None:
    env = dict(WEBUI_ENV)
    for a in plan(env):
        env[ip.normalize(a.name)] = a.spec.split("==")[1]
    assert plan(env) == []


def test_newer_user_versions_are_left_alone() -> None:
    env = dict(WEBUI_ENV, diffusers="0.42.1", peft="0.21.2", tomli="2.3.0")
    assert plan(env) == []


def test_a_missing_helper_dependency_is_installed_with_its_deps() -> None:
    env = {k: v for k, v in WEBUI_ENV.items() if k != "importlib-metadata"}
    [action] = [a for a in plan(env) if a.name == "importlib-metadata"]
    assert action.args == 'install "importlib-metadata==8.5.0"'


def test_too_old_version_is_replaced() -> None:
    env = dict(WEBUI_ENV, diffusers="0.35.2", peft="0.6.0", tomli="2.2.1")
    [action] = plan(env)
    assert action.spec == "peft==0.13.2" and "older" in action.reason


def test_pinned_packages_are_never_planned_even_when_missing() -> None:
    env = {k: v for k, v in WEBUI_ENV.items() if k not in ("torch", "gradio", "transformers", "xformers")}
    names = {ip.normalize(a.name) for a in plan(env)}
    assert names.isdisjoint(ip.HOST_PINNED)
    reqs = ip.REQUIREMENTS + (ip.Requirement("torch", "2.0", "2.5.0"),)
    assert all(a.name != "torch" for a in plan({}, reqs))
    with pytest.raises(ValueError, match="torch"):
        ip.check_pins_untouched([ip.Action("torch", "torch==2.5.0", 'install "torch==2.5.0"', "")])


@pytest.mark.parametrize(("hub", "expected"), [
    ("0.36.2", "0.35.2"), ("0.34.0", "0.35.2"), ("0.30.1", "0.34.0"), ("0.25.0", "0.32.2"),
    ("0.20.3", "0.27.2"), ("0.14.1", None), (None, None),
])
def test_diffusers_follows_the_installed_hub(hub: str | None, expected: str | None) -> None:
    assert ip.diffusers_for_hub(hub) == expected
    env = {k: v for k, v in WEBUI_ENV.items() if k != "huggingface-hub"}
    if hub:
        env["huggingface-hub"] = hub
    [diff] = [a for a in plan(env) if a.name == "diffusers"]
    assert (diff.spec == f"diffusers=={expected}") if expected else (diff.args == "" and "huggingface_hub" in diff.reason)


def test_version_tuple() -> None:
    assert ip.version_tuple("2.1.2+cu121") == (2, 1, 2)
    assert ip.version_tuple("0.4.2rc1") == (0, 4, 2)
    assert ip.version_tuple("0.0.23.post1") == (0, 0, 23)


def test_install_py_calls_run_pip_only_for_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    launch = types.ModuleType("launch")
    launch.run_pip = lambda args, desc=None: calls.append(args)
    monkeypatch.setitem(sys.modules, "launch", launch)
    from importlib import metadata
    env = dict(WEBUI_ENV)

    def fake_version(name: str) -> str:
        v = env.get(ip.normalize(name))
        if v is None:
            raise metadata.PackageNotFoundError(name)
        return v

    monkeypatch.setattr(metadata, "version", fake_version)
    runpy.run_path(str(ROOT / "install.py"), run_name="__main__")
    tomli = ['install "tomli==2.2.1" --no-deps'] if sys.version_info < (3, 11) else []  # this Python's
    assert calls == ['install "diffusers==0.35.2" --no-deps', 'install "peft==0.13.2" --no-deps', *tomli]
    env.update({"diffusers": "0.35.2", "peft": "0.13.2", "tomli": "2.2.1"})
    calls.clear()
    runpy.run_path(str(ROOT / "install.py"), run_name="__main__")
    assert calls == []

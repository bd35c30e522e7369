"""WebUI installer: run by the A1111 WebUI (as a subprocess) when the extension loads.

Installs only what is missing, in versions that work with the WebUI's pins, through the
WebUI's own ``launch.run_pip``. Never installs, upgrades or downgrades torch, torchvision,
xformers, gradio, transformers or anything else the WebUI pins; a second start installs
nothing. The decisions live in ``lora_trainer/hosts/install_plan.py`` (tested without a WebUI).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib import metadata


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _load_plan_module():
    # Load the planner by file path: importing the ``lora_trainer`` package here would import
    # nothing heavy, but the path keeps install.py independent of sys.path order in the WebUI.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lora_trainer", "hosts", "install_plan.py")
    spec = importlib.util.spec_from_file_location("lora_trainer_install_plan", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


def main() -> None:
    import launch  # the WebUI's launcher module; present only inside the WebUI

    plan = _load_plan_module()
    actions = plan.plan_installs(_installed_version)
    plan.check_pins_untouched(actions)
    for action in actions:
        if not action.args:
            print(f"[lora-trainer] {action.name}: {action.reason}")
            continue
        launch.run_pip(action.args, f"{action.spec} for lora-trainer ({action.reason})")


if __name__ == "__main__":
    main()

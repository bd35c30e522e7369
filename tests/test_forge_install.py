"""install.py's decisions on each Forge's pinned stack (read from their requirements files and
launch code): nothing where Forge already pins what we need, only peft where it does not, and
never a package Forge pins."""

from __future__ import annotations

import pytest

from lora_trainer.hosts import install_plan as ip

COMMON = {"pyyaml": "6.0.2", "filelock": "3.16.1", "regex": "2024.11.6", "requests": "2.32.3",
          "importlib-metadata": "8.5.0"}
# Forge Neo 2.26 (requirements.txt, launch_utils: torch 2.11.0, gradio 4.40.0).
NEO = {**COMMON, "torch": "2.11.0+cu130", "torchvision": "0.26.0+cu130", "gradio": "4.40.0",
       "transformers": "4.56.2", "diffusers": "0.37.1", "peft": "0.17.1", "accelerate": "1.13.0",
       "safetensors": "0.7.0", "numpy": "2.3.5", "pillow": "12.2.0", "huggingface-hub": "0.36.2", "pyyaml": "6.0.3"}
# Forge Classic (early 2025: requirements.txt, launch_utils: torch 2.6.0).
CLASSIC = {**COMMON, "torch": "2.6.0+cu126", "torchvision": "0.21.0+cu126", "gradio": "3.41.2",
           "transformers": "4.30.2", "diffusers": "0.31.0", "accelerate": "0.21.0", "safetensors": "0.4.2",
           "numpy": "1.26.2", "pillow": "9.5.0", "huggingface-hub": "0.26.5"}
# lllyasviel's Forge (mid 2025: requirements_versions.txt, launch_utils: torch 2.3.1).
LLLYASVIEL = {**COMMON, "torch": "2.3.1", "gradio": "4.40.0", "transformers": "4.46.1", "diffusers": "0.31.0",
              "peft": "0.13.2", "accelerate": "0.31.0", "safetensors": "0.4.2", "numpy": "1.26.2",
              "pillow": "9.5.0", "huggingface-hub": "0.26.2"}


def lookup(env: dict[str, str]):
    return lambda name: env.get(ip.normalize(name))


# Python: Neo 3.13; Classic and lllyasviel's Forge 3.10, whose standard library has no tomllib.
@pytest.mark.parametrize(("env", "python", "expected"), [
    (NEO, (3, 13), []), (LLLYASVIEL, (3, 10), ["tomli==2.2.1"]), (CLASSIC, (3, 10), ["peft==0.13.2", "tomli==2.2.1"]),
], ids=["neo", "lllyasviel", "classic"])
def test_forge_stacks_get_only_what_is_missing(env: dict[str, str], python: tuple[int, int],
                                               expected: list[str]) -> None:
    actions = ip.plan_installs(lookup(env), python=python)
    assert [a.spec for a in actions] == expected
    assert all(a.args.endswith("--no-deps") for a in actions)  # peft's dependencies are Forge's pins; tomli has none
    ip.check_pins_untouched(actions)
    after = {**env, **{ip.normalize(a.name): a.spec.split("==")[1] for a in actions}}
    assert ip.plan_installs(lookup(after), python=python) == []  # a second start installs nothing

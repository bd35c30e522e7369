"""scripts/lora_trainer_tab.py in the Forge stand-in: the Forge host is chosen, the tab shows the
loaded checkpoint, the loaded model's family decides presets and LoRA format (SDXL here), and
a family we cannot train answers with one line through the API."""

from __future__ import annotations

import runpy
from pathlib import Path

import forge_env
import numpy as np
import pytest
import torch
import webui_api

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "lora_trainer_tab.py"


@pytest.fixture(scope="module")
def sdxl(forge):
    with torch.inference_mode():  # as Forge Neo loads it
        return forge.tiny_forge.StableDiffusionXL(seed=0)


@pytest.fixture
def script(forge, sdxl, tmp_path: Path):
    forge_env.reset(forge, sdxl, tmp_path / "Lora")
    forge.script_callbacks.clear_callbacks()
    forge.ns = runpy.run_path(str(SCRIPT), run_name="lora_trainer_tab")
    return forge


def test_the_script_picks_the_forge_host_and_the_tab_shows_the_checkpoint(script) -> None:
    from lora_trainer.hosts.forge import ForgeHost

    assert isinstance(script.ns["lt_host"](), ForgeHost)
    [(blocks, title, _)] = script.script_callbacks.ui_tabs_callback()
    field = blocks.lt_context.fields["model.base_model"]
    assert title == "Train LoRA" and "tiny-forge-sdxl.safetensors" in str(field.value)


def test_sdxl_in_forge_gets_sdxl_presets_and_trains_an_sdxl_lora_forge_loads(script, tmp_path: Path) -> None:
    from lora_trainer.data.demo import make_demo_dataset
    from lora_trainer.hosts import live_model
    from lora_trainer.lora.files import read_lora_file
    from lora_trainer.ui import presets
    from lora_trainer.ui.train_section import preset_for_host

    host = script.ns["lt_host"]()
    assert host.loaded_model().family == "sdxl"
    assert preset_for_host(host, "8 GB", "auto") == presets.preset_values("8 GB", "sdxl", compute_dtype="fp32")
    engine = script.shared.sd_model
    before = live_model.state_hash(engine.forge_objects.unet.model)
    data = make_demo_dataset(tmp_path / "data", n=2)
    cfg = {"data": {"train_data_dir": str(data), "resolution": 64, "enable_buckets": False, "min_image_size": 16},
           "network": {"rank": 2, "alpha": 1}, "optim": {"learning_rate": 0.1}, "train": {"max_train_steps": 2},
           "output": {"output_dir": str(tmp_path / "out"), "output_name": "xl_lora", "tensorboard": False}}
    client = webui_api.client(script.script_callbacks)
    st = webui_api.wait(client, client.post("/lora_trainer/train", json=cfg).json()["job_id"])
    assert st["status"] == "done", st
    path = Path(st["result"]["lora_path"])
    tensors, meta = read_lora_file(path)
    assert meta["ss_base_model_version"].startswith("sdxl") and meta["modelspec.architecture"].startswith("stable-diffusion-xl")
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)  # SDXL's LDM names
    assert live_model.state_hash(engine.forge_objects.unet.model) == before
    [off, on] = host.render("a cat", "", 3, "xl_lora", [0.0, 1.0], 2, 64, 64)
    assert script.networks.last_unmatched[str(path)] == [] and not script.networks.dropped
    assert np.abs(np.asarray(on, dtype=np.int16) - np.asarray(off, dtype=np.int16)).max() > 0


def test_an_untrainable_forge_model_is_one_line_through_the_api(script, tmp_path: Path) -> None:
    forge_env.reset(script, script.tiny_forge.Flux(), tmp_path / "Lora")
    cfg = {"data": {"train_data_dir": str(tmp_path)}, "output": {"output_dir": str(tmp_path / "out")}}
    res = webui_api.client(script.script_callbacks).post("/lora_trainer/train", json=cfg)
    assert res.status_code == 409 and res.json()["detail"].startswith("the loaded model is Flux; ")
    assert "\n" not in res.json()["detail"]

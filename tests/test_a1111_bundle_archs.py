"""hosts/a1111_bundle on SD2 (eps and v) and SDXL shaped models, as A1111 v1.10.1 lays them out.

SD1 runs on the real LDM classes in test_a1111_host.py; here small modules carry exactly the
attribute paths the WebUI has for SD2 (open_clip text encoder under ``cond_stage_model.wrapped``)
and SDXL (``conditioner.embedders``: CLIP-L, OpenCLIP bigG, then the size embedders).
"""

from __future__ import annotations

import pytest
import torch
from webui_models import make_model

from lora_trainer.hosts.a1111_bundle import bundle_from_sd_model, trainable_modules


@pytest.mark.parametrize(("arch", "param", "pred", "res"), [
    ("sd1", "eps", "epsilon", 512), ("sd2", "eps", "epsilon", 512), ("sd2", "v", "v_prediction", 768),
    ("sdxl", "eps", "epsilon", 1024)])
def test_bundle_per_architecture(arch: str, param: str, pred: str, res: int) -> None:
    m = make_model(arch, param)
    roots = trainable_modules(m)
    b = bundle_from_sd_model(m, roots, torch.device("cpu"))
    assert (b.arch, b.prediction_type, b.default_resolution, b.unet_naming) == (arch, pred, res, "ldm")
    assert b.unet is m.model.diffusion_model and b.vae is m.first_stage_model
    assert torch.equal(b.alphas_cumprod, m.alphas_cumprod_original)  # the checkpoint's schedule
    parts = {p.key: p for p in b.text_encoders}
    if arch == "sd1":
        assert parts["te"].module is m.cond_stage_model.wrapped.transformer and parts["te"].naming == "hf_clip"
    elif arch == "sd2":
        assert parts["te"].module is m.cond_stage_model.wrapped and parts["te"].naming == "open_clip"
    else:
        e = m.conditioner.embedders
        assert parts["te1"].module is e[0].wrapped.transformer and parts["te1"].naming == "hf_clip"
        assert parts["te2"].module is e[1].wrapped and parts["te2"].naming == "open_clip"


def test_sdxl_conditioning_and_size_vector() -> None:
    m = make_model("sdxl")
    b = bundle_from_sd_model(m, trainable_modules(m), torch.device("cpu"))
    cond = b.encode_text(["a", "b"])
    assert cond["context"].shape == (2, 77, 2048) and cond["pooled"].shape == (2, 1280)
    x = torch.zeros(2, 4, 8, 8)
    b.predict(x, torch.tensor([1, 2]), cond, None)
    assert torch.equal(m.model.diffusion_model.seen["y"], cond["vector"])  # WebUI's default sizes
    size = torch.tensor([[512.0, 768, 0, 16, 1024, 1024], [1024, 1024, 8, 0, 1024, 1024]])
    b.predict(x, torch.tensor([1, 2]), cond, size)
    y = m.model.diffusion_model.seen["y"]
    assert y.shape == (2, 2816)
    assert torch.equal(y[:, :1280], cond["pooled"])
    assert torch.equal(y[0, 1280:1280 + 512], torch.tensor([512.0, 768]).repeat_interleave(256))
    assert torch.equal(y[0, 1280 + 512:1280 + 1024], torch.tensor([0.0, 16]).repeat_interleave(256))

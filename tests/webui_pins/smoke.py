"""Smoke test in an environment with the A1111 v1.10.1 pins (see check.sh).

Imports diffusers and peft in the versions install.py chooses next to transformers 4.30.2 /
accelerate 0.21.0 / safetensors 0.4.x, puts our LoRA into a tiny UNet and CLIP text encoder
(transformers 4.30 lays CLIP out as ``text_model.*``), trains one step, writes a kohya file and
reads it back, and checks the base modules come back exactly. Exits non-zero on any failure.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch


def main() -> int:
    import accelerate
    import diffusers
    import peft
    import safetensors
    import transformers
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_trainer.config import NetworkConfig
    from lora_trainer.lora.files import read_lora_file, save_lora_file
    from lora_trainer.lora.inject import inject_lora
    from lora_trainer.models.bundle import ModelBundle, TextEncoderPart

    print("versions:", {m.__name__: m.__version__ for m in (torch, transformers, accelerate, safetensors, diffusers, peft)})
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                      num_hidden_layers=2, vocab_size=1000))
    base = {k: v.clone() for k, v in {**unet.state_dict(), **{f"te.{k}": v for k, v in te.state_dict().items()}}.items()}
    sched = DDPMScheduler()

    def encode_text(captions: list[str]) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 1000, (len(captions), 8), generator=torch.Generator().manual_seed(1))
        return {"context": te(ids)[0]}

    def predict(x, t, cond, size_info):
        return unet(x, t, encoder_hidden_states=cond["context"]).sample

    bundle = ModelBundle(arch="sd1", prediction_type="epsilon", unet=unet, unet_naming="diffusers",
                         text_encoders=[TextEncoderPart("te", te, "hf_clip")], vae=None,
                         alphas_cumprod=sched.alphas_cumprod, encode_images=lambda x: x, encode_text=encode_text,
                         predict=predict)
    unet.requires_grad_(False)
    te.requires_grad_(False)
    net = inject_lora(bundle, NetworkConfig(rank=4, alpha=2.0, train_text_encoder=True))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    x = torch.randn(2, 4, 8, 8)
    t = torch.randint(0, 1000, (2,))
    noise = torch.randn_like(x)
    loss = torch.nn.functional.mse_loss(predict(sched.add_noise(x, noise, t), t, encode_text(["a", "b"]), None), noise)
    loss.backward()
    opt.step()
    tensors = net.to_kohya()
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in tensors), sorted(tensors)[:5]
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in tensors), sorted(tensors)[:5]
    with tempfile.TemporaryDirectory() as d:
        path = save_lora_file(Path(d) / "smoke.safetensors", tensors, {"ss_network_dim": "4"})
        back, meta = read_lora_file(path)
        assert set(back) == set(tensors) and meta.get("ss_network_dim") == "4"
    net.remove()
    after = {**unet.state_dict(), **{f"te.{k}": v for k, v in te.state_dict().items()}}
    assert set(after) == set(base), "module names changed after remove()"
    assert all(torch.equal(after[k], base[k]) for k in base), "base weights changed"
    print(f"ok: {len(tensors)} tensors, loss {loss.item():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

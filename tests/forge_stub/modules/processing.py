"""Stand-in for Forge Neo's ``modules/processing.py``: txt2img with the loaded engine.

``process_images`` loads the selected checkpoint (``forge_model_reload``), activates
``<lora:name:w>`` through the Lora extension (patcher clones with patches, skipped when
``current_lora_hash`` is unchanged), restarts from ``forge_objects_after_applying_lora``, has the
memory manager load the UNet (merging the patches into its weights) and denoises with a few
plain DDIM-like steps, so a LoRA's effect shows in the image.
"""

import re

import numpy as np
import torch
from backend import memory_management
from PIL import Image

from modules import sd_models

_LORA = re.compile(r"<lora:([^:>]+):([^>]+)>")


class StableDiffusionProcessingTxt2Img:
    def __init__(self, sd_model=None, prompt="", negative_prompt="", seed=-1, steps=20, width=512, height=512,
                 batch_size=1, n_iter=1, cfg_scale=7.0, do_not_save_samples=False, do_not_save_grid=False, **kwargs):
        self.sd_model, self.prompt, self.negative_prompt, self.seed = sd_model, prompt, negative_prompt, seed
        self.steps, self.width, self.height = steps, width, height
        self.closed = False

    def close(self):
        self.closed = True


class Processed:
    def __init__(self, p, images):
        self.images, self.prompt = images, p.prompt


history: list[str] = []  # test aid: prompts rendered


def process_images(p):
    import networks

    history.append(p.prompt)
    model, _ = sd_models.forge_model_reload()
    p.sd_model = model
    found = _LORA.findall(p.prompt)
    prompt = _LORA.sub("", p.prompt).strip()
    weights = [float(w) for _, w in found]
    networks.load_networks([n for n, _ in found], weights, weights)
    model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()
    g = torch.Generator().manual_seed(int(p.seed))
    with torch.inference_mode():
        cond = model.get_learned_conditioning([prompt])
        kwargs = {"context": cond["crossattn"], "y": cond["vector"]} if isinstance(cond, dict) else {"context": cond}
        memory_management.load_models_gpu([model.forge_objects.unet])
        kmodel = model.forge_objects.unet.model
        ac = kmodel.predictor.alphas_cumprod
        x = torch.randn(1, 4, p.height // 8, p.width // 8, generator=g)
        ts = torch.linspace(len(ac) - 1, 0, p.steps).long()
        for t in ts:
            eps = kmodel.diffusion_model(x.to(kmodel.computation_dtype), t.reshape(1), **kwargs).float()
            a, prev = ac[t], ac[max(int(t) - 50, 0)]
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = x0 if t == 0 else x0 * prev.sqrt() + (1 - prev).sqrt() * eps
        img = model.decode_first_stage(x)[0]
    arr = ((img.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).byte().numpy()
    return Processed(p, [Image.fromarray(np.ascontiguousarray(arr))])

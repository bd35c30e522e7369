"""Stand-in for ``modules/processing.py`` (v1.10.1): txt2img through the loaded model.

``process_images`` activates ``<lora:name:w>`` from the prompt through the Lora extension
(``networks.load_networks`` then the in-place merge), as the WebUI does, and denoises with the
live model (a few plain Euler steps), so a LoRA's effect shows in the image.
"""

import re

import numpy as np
import torch
from PIL import Image

from modules import shared

_LORA = re.compile(r"<lora:([^:>]+):([^>]+)>")


class StableDiffusionProcessingTxt2Img:
    def __init__(self, sd_model=None, prompt="", negative_prompt="", seed=-1, steps=20, width=512, height=512,
                 batch_size=1, n_iter=1, cfg_scale=7.0, sampler_name=None, do_not_save_samples=False,
                 do_not_save_grid=False, **kwargs):
        self.sd_model, self.prompt, self.negative_prompt, self.seed = sd_model, prompt, negative_prompt, seed
        self.steps, self.width, self.height, self.batch_size, self.n_iter = steps, width, height, batch_size, n_iter
        self.cfg_scale, self.do_not_save_samples, self.do_not_save_grid = cfg_scale, do_not_save_samples, do_not_save_grid
        self.closed = False

    def close(self):
        self.closed = True


class Processed:
    def __init__(self, p, images, infotexts):
        self.images, self.infotexts, self.prompt = images, infotexts, p.prompt


history: list[str] = []  # test aid: prompts rendered


def process_images(p):
    import networks

    history.append(p.prompt)
    if shared.state.interrupted:  # the WebUI's sampling loop breaks before its first batch
        return Processed(p, [], [])
    found = _LORA.findall(p.prompt)
    prompt = _LORA.sub("", p.prompt).strip()
    networks.load_networks([n for n, _ in found], [float(w) for _, w in found], [float(w) for _, w in found])
    model = p.sd_model or shared.sd_model
    g = torch.Generator().manual_seed(int(p.seed))
    with torch.no_grad():  # as the WebUI's: LoRA weights are merged inside the no_grad sampling
        networks.apply_to_model(model)
        cond = model.get_learned_conditioning([prompt])
        x = torch.randn(1, 4, p.height // 8, p.width // 8, generator=g)
        ac = model.alphas_cumprod
        ts = torch.linspace(len(ac) - 1, 0, p.steps).long()
        for t in ts:
            eps = model.model.diffusion_model(x, t.reshape(1), context=cond)
            a = ac[t]
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = x0 if t == 0 else x0 * ac[max(int(t) - 50, 0)].sqrt() + (1 - ac[max(int(t) - 50, 0)]).sqrt() * eps
        img = model.decode_first_stage(x)[0]
    arr = ((img.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).byte().numpy()
    return Processed(p, [Image.fromarray(np.ascontiguousarray(arr))], [p.prompt])

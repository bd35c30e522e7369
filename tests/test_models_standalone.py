"""StandaloneHost: cached model, LoRA folder, and test renders through diffusers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lora_trainer.config import NetworkConfig, TrainConfig
from lora_trainer.errors import HostError
from lora_trainer.hosts.base import Host
from lora_trainer.hosts.standalone import StandaloneHost, build_render_pipeline, strip_network_tags
from lora_trainer.lora.files import save_lora_file
from lora_trainer.lora.inject import inject_lora


def _config(tmp_path) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.base_model = "demo"
    cfg.model.device = "cpu"
    cfg.output.output_dir = str(tmp_path / "loras")
    return cfg


@pytest.fixture(scope="module")
def host_and_lora(tmp_path_factory):
    """A host holding the demo model and a LoRA file with non-zero weights (UNet and text encoder)."""
    tmp_path = tmp_path_factory.mktemp("standalone")
    cfg = _config(tmp_path)
    host = StandaloneHost()
    bundle = host.acquire_bundle(cfg)
    net = inject_lora(bundle, NetworkConfig(rank=4, alpha=2.0, train_text_encoder=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    tensors = net.to_kohya(torch.float32)
    net.remove()
    save_lora_file(host.lora_dir(cfg) / "test_lora.safetensors", tensors, {"ss_network_dim": "4"})
    host.release_bundle(bundle)
    return host, cfg, bundle, tensors


def test_host_protocol_and_cache(host_and_lora):
    host, cfg, bundle, _ = host_and_lora
    assert isinstance(host, Host)
    assert host.acquire_bundle(cfg) is bundle  # cached: no reload for the next run
    assert host.lora_dir(cfg) == Path(cfg.output.output_dir)
    assert host.lora_path_for("test_lora") == host.lora_dir(cfg) / "test_lora.safetensors"
    with host.lock():
        assert not host.interrupted()
    host.refresh_loras()


def test_leftover_lora_layers_drop_the_cache(tmp_path):
    host = StandaloneHost()
    cfg = _config(tmp_path)
    bundle = host.acquire_bundle(cfg)
    inject_lora(bundle, NetworkConfig(rank=2, alpha=1.0))  # never removed, like a crashed run
    host.release_bundle(bundle)
    assert host.acquire_bundle(cfg) is not bundle


def test_strip_network_tags():
    assert strip_network_tags("a cat <lora:style:0.8>, best") == "a cat, best"
    assert strip_network_tags("<lora:a:1> <LyCO:b:0.5>, a dog,  <hypernet:x:1>") == "a dog"


def _to_array(img):
    return np.asarray(img).astype(np.int16)


def test_render_weights(host_and_lora):
    host, cfg, bundle, tensors = host_and_lora
    roots = bundle.trainable_roots()
    before = {r: {k: v.clone() for k, v in m.state_dict().items()} for r, m in roots.items()}
    images = host.render("a photo of a cat <lora:test_lora:1>", "", 7, "test_lora", [0.0, 1.0], steps=3,
                         width=64, height=64)
    assert [im.size for im in images] == [(64, 64), (64, 64)]

    # Weight 0 is exactly the base model; the pipeline and the model are unchanged afterwards.
    pipe = build_render_pipeline(bundle)
    base = _pipeline_image(pipe, bundle, "a photo of a cat", 7)
    assert np.array_equal(_to_array(images[0]), base)
    for r, m in roots.items():
        after = m.state_dict()
        assert after.keys() == before[r].keys() and all(torch.equal(after[k], before[r][k]) for k in after), r

    # Weight 1 differs, and matches our own injection of the same file (diffusers reads alpha/rank as we do).
    assert np.abs(_to_array(images[1]) - base).max() > 10
    net = inject_lora(bundle, NetworkConfig(rank=4, alpha=2.0, train_text_encoder=True))
    try:
        net.load_kohya(tensors)
        ours = _pipeline_image(pipe, bundle, "a photo of a cat", 7)
        with pytest.raises(HostError, match="LoRA layers"):
            host.render("x", "", 1, "test_lora", [1.0], 2, 64, 64)
    finally:
        net.remove()
    assert np.abs(_to_array(images[1]) - ours).max() <= 2


def test_render_reads_emphasis_as_training_samples_do(host_and_lora):
    """A prompt (or negative prompt) with the WebUI's emphasis renders from the weighted embeddings
    training's samples use; the brackets are not text the pipeline sees."""
    host, cfg, bundle, _ = host_and_lora
    pipe = build_render_pipeline(bundle)
    prompt, negative = "a photo of a (cat:1.5)", "[blurry]"
    [got] = host.render(prompt, negative, 7, "test_lora", [0.0], steps=3, width=64, height=64)
    with torch.no_grad():
        cond, neg = bundle.encode_weighted([prompt]), bundle.encode_weighted([negative])
        latents = pipe(prompt_embeds=cond["context"], negative_prompt_embeds=neg["context"], num_inference_steps=3,
                       width=64, height=64, guidance_scale=7.0, generator=torch.Generator().manual_seed(7),
                       output_type="latent").images
        px = bundle.decode_latents(latents)
    want = ((px[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.int16)
    assert np.array_equal(_to_array(got), want)
    literal = _pipeline_image(pipe, bundle, prompt, 7)  # the brackets as text
    assert not np.array_equal(_to_array(got), literal)


def test_render_sdxl_matches_own_injection(tmp_path):
    """SDXL kohya files name UNet modules the LDM way; diffusers must read the file as we do."""
    from lora_trainer.models import tiny

    tiny.build_pipeline("sdxl").save_pretrained(tmp_path / "xl")
    cfg = _config(tmp_path)
    cfg.model.base_model = str(tmp_path / "xl")
    host = StandaloneHost()
    bundle = host.acquire_bundle(cfg)
    network_cfg = NetworkConfig(rank=4, alpha=8.0, train_text_encoder=True)
    net = inject_lora(bundle, network_cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    tensors = net.to_kohya(torch.float32)
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)
    net.remove()
    pipe = build_render_pipeline(bundle)
    base = _pipeline_image(pipe, bundle, "a red car", 3)
    net = inject_lora(bundle, network_cfg)
    try:
        net.load_kohya(tensors)
        ours = _pipeline_image(pipe, bundle, "a red car", 3)
    finally:
        net.remove()
    save_lora_file(host.lora_dir(cfg) / "xl_lora.safetensors", tensors, {})
    zero, one = host.render("a red car", "", 3, "xl_lora", [0.0, 1.0], 3, 64, 64)
    assert np.array_equal(_to_array(zero), base)
    [weighed] = host.render("a (red:1.6) car", "(blue:1.2)", 3, "xl_lora", [0.0], 3, 64, 64)  # pooled ones too
    assert not np.array_equal(_to_array(weighed), base)
    assert np.abs(_to_array(one) - base).max() > 10
    assert np.abs(_to_array(one) - ours).max() <= 2


def _pipeline_image(pipe, bundle, prompt, seed):
    with torch.no_grad():
        latents = pipe(prompt=prompt, num_inference_steps=3, width=64, height=64, guidance_scale=7.0,
                       generator=torch.Generator().manual_seed(seed), output_type="latent").images
        px = bundle.decode_latents(latents)
    return ((px[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.int16)


def test_render_errors(tmp_path):
    host = StandaloneHost()
    with pytest.raises(HostError, match="no model"):
        host.render("x", "", 1, "nope", [1.0], 2, 64, 64)
    host.acquire_bundle(_config(tmp_path))
    with pytest.raises(HostError, match="not found"):
        host.render("x", "", 1, "nope", [1.0], 2, 64, 64)


def test_render_says_so_when_diffusers_pipelines_do_not_import(host_and_lora, monkeypatch: pytest.MonkeyPatch):
    """diffusers 0.35's pipelines need a newer transformers than 4.30 (the A1111 WebUI's): the
    Test section says so in one line instead of an 'unexpected error'."""
    import diffusers

    host = host_and_lora[0]
    real = type(diffusers).__getattr__

    def broken(module, attr):
        if attr.endswith("Pipeline"):
            raise RuntimeError("Failed to import diffusers.pipelines...\ncannot import name 'SiglipImageProcessor'")
        return real(module, attr)

    monkeypatch.delitem(vars(diffusers), "StableDiffusionPipeline", raising=False)  # as if not imported yet
    monkeypatch.setattr(type(diffusers), "__getattr__", broken)
    with pytest.raises(HostError, match="Test section renders with diffusers' StableDiffusionPipeline.*SiglipImage"):
        host.render("x", "", 1, "test_lora", [1.0], 2, 64, 64)

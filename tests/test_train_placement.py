"""Where the model's parts sit while a run caches and trains: each encoder alone on the card (the
denoiser parked while captions and latents are encoded), the denoiser placed after the caches
when its loader left it in the host's memory, and everything back as it came.

The CPU has no second device: ``train_helpers.FakeCard`` stands in for one where the trainer
asks (``placement.device_of`` / ``placement.move``), and every move copies each tensor into new
memory through the path ``nn.Module.to`` takes, so the parameter objects and bits are checked
after real copies. The GPU test does it on a real card.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_trainer.models import placement
from lora_trainer.train.trainer import Trainer
from tests.train_helpers import CARD, FakeCard, TinyHost, make_data, tiny_bundle, tiny_config, watch_placement


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"), n=2)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_each_encoder_is_alone_on_the_card_and_the_model_comes_back_exact(
        tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tiny_bundle("sdxl")  # a host's model, all of it on the card
    parts = {"unet": bundle.unet, "vae": bundle.vae, **{p.key: p.module for p in bundle.text_encoders}}
    card = FakeCard(monkeypatch, **parts)
    before = {k: _state(m) for k, m in parts.items()}
    params = {k: list(m.parameters()) for k, m in parts.items()}
    seen = watch_placement(card, bundle)
    Trainer(tiny_config(data, tmp_path / "out", **{"train.max_train_steps": 2}), host=TinyHost("sdxl", bundle=bundle)).run()
    off = {"te1": "cpu", "te2": "cpu"}
    assert seen["text"] and all(w == {"unet": "cpu", "vae": "cpu", "te1": "cuda", "te2": "cuda"} for w in seen["text"])
    assert seen["latents"] and all(w == {"unet": "cpu", "vae": "cuda", **off} for w in seen["latents"])
    assert seen["step"] and all(w == {"unet": "cuda", "vae": "cpu", **off} for w in seen["step"])
    # one trip off the card and back for the denoiser, after the encoders left it; the VAE waits
    # while the captions are encoded; at the end the encoders come back
    assert card.moves == [("unet", "cpu"), ("vae", "cpu"), ("te1", "cpu"), ("te2", "cpu"), ("vae", "cuda"),
                          ("vae", "cpu"), ("unet", "cuda"), ("vae", "cuda"), ("te2", "cuda"), ("te1", "cuda")]
    # handed back as it came: on the card, the same parameter objects, the same bits
    assert card.where(bundle) == dict.fromkeys(parts, "cuda")
    for k, m in parts.items():
        assert all(p is q for p, q in zip(m.parameters(), params[k], strict=True))
        after = m.state_dict()
        assert after.keys() == before[k].keys() and all(torch.equal(before[k][n], after[n]) for n in after), k


def test_a_denoiser_its_loader_left_in_host_memory_is_placed_after_the_caches(
        tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tiny_bundle("sd1")
    bundle.extras[placement.DENOISER_DEVICE] = CARD  # as the standalone loader leaves it
    te = bundle.text_encoders[0].module
    card = FakeCard(monkeypatch, vae=bundle.vae, te=te)  # the denoiser is in the host's memory
    card.name(unet=bundle.unet)
    seen = watch_placement(card, bundle)
    Trainer(tiny_config(data, tmp_path / "out", **{"train.max_train_steps": 2}), host=TinyHost("sd1", bundle=bundle)).run()
    assert seen["text"] and all(w == {"unet": "cpu", "vae": "cpu", "te": "cuda"} for w in seen["text"])
    assert seen["latents"] and all(w == {"unet": "cpu", "vae": "cuda", "te": "cpu"} for w in seen["latents"])
    assert seen["step"] and all(w == {"unet": "cuda", "vae": "cpu", "te": "cpu"} for w in seen["step"])
    # back as loaded; the denoiser leaves the card before the encoders return to it
    assert card.where(bundle) == {"unet": "cpu", "vae": "cuda", "te": "cuda"}
    assert card.moves[-3:] == [("unet", "cpu"), ("vae", "cuda"), ("te", "cuda")]
    assert ("unet", "cpu") not in card.moves[:-3]  # placed once, never parked on the way
    # a test render between runs puts it on the card for the render only
    with placement.denoiser_placed(bundle):
        assert card.where(bundle)["unet"] == "cuda"
    assert card.where(bundle)["unet"] == "cpu"


def test_parked_modules_come_back_when_the_block_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tiny_bundle("sd1")
    card = FakeCard(monkeypatch, unet=bundle.unet, vae=bundle.vae)
    with pytest.raises(RuntimeError, match="the encoder failed"), placement.parked(bundle.unet, bundle.vae, bundle.unet):
        assert card.where(bundle)["unet"] == card.where(bundle)["vae"] == "cpu"
        raise RuntimeError("the encoder failed")
    assert card.where(bundle)["unet"] == card.where(bundle)["vae"] == "cuda"
    assert card.moves == [("unet", "cpu"), ("vae", "cpu"), ("vae", "cuda"), ("unet", "cuda")]


def test_loaders_leave_the_denoiser_in_host_memory_only_when_asked() -> None:
    from lora_trainer.models.setups import bundle_from_diffusers
    from lora_trainer.models.tiny import build_components

    meta = torch.device("meta")  # a device other than the CPU; nothing is allocated
    plain = bundle_from_diffusers(build_components("sd1"), "sd1", None, meta, torch.float32, "tiny")
    assert placement.device_of(plain.unet) == meta and placement.DENOISER_DEVICE not in plain.extras
    with placement.denoiser_placed_later():
        later = bundle_from_diffusers(build_components("sd1"), "sd1", None, meta, torch.float32, "tiny")
    assert placement.device_of(later.unet).type == "cpu" and later.extras[placement.DENOISER_DEVICE] == meta
    assert placement.device_of(later.vae) == placement.device_of(later.text_encoders[0].module) == meta
    with placement.denoiser_placed_later():  # a bundle for the CPU has nowhere else to be
        cpu = bundle_from_diffusers(build_components("sd1"), "sd1", None, torch.device("cpu"), torch.float32, "t")
    assert placement.DENOISER_DEVICE not in cpu.extras


@pytest.mark.gpu
def test_the_denoiser_leaves_the_gpu_while_captions_are_encoded_and_comes_back_the_same(
        tmp_path: Path, data: Path) -> None:
    from lora_trainer.models.setups import bundle_from_diffusers
    from lora_trainer.models.tiny import build_components

    bundle = bundle_from_diffusers(build_components("sd1"), "sd1", None, torch.device("cuda"), torch.bfloat16, "tiny")
    before, params = _state(bundle.unet), list(bundle.unet.parameters())
    seen: list[tuple[str, str]] = []
    bundle.text_encoders[0].module.register_forward_pre_hook(
        lambda *_: seen.append((next(bundle.unet.parameters()).device.type, next(bundle.vae.parameters()).device.type)))
    cfg = tiny_config(data, tmp_path / "out", **{"model.device": "cuda", "train.mixed_precision": "bf16",
                                                 "train.max_train_steps": 2})
    Trainer(cfg, host=TinyHost("sd1", bundle=bundle)).run()
    assert seen and set(seen) == {("cpu", "cpu")}
    assert all(p is q for p, q in zip(bundle.unet.parameters(), params, strict=True))
    after = bundle.unet.state_dict()
    assert all(after[k].device.type == "cuda" and torch.equal(before[k], after[k]) for k in before)

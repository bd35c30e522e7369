"""BLIP captioning with a tiny model saved to a folder and loaded the way users load theirs."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.caption.blip import (
    BlipOptions,
    Captioner,
    FunctionCaptioner,
    load_blip,
    models_dir,
    resolve_blip_source,
)
from lora_trainer.errors import ConfigError, ModelLoadError
from tests.caption_models import WORDS, save_tiny_blip


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_blip(tmp_path_factory.mktemp("blip") / "tiny-blip")


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 50), (255, 0, 0)), Image.new("RGB", (64, 32), (0, 0, 255)),
            Image.new("RGB", (32, 32), (0, 255, 0))]


def test_batch_captions_one_per_image_from_vocab(blip_dir: Path) -> None:
    cap = load_blip(BlipOptions(model=str(blip_dir), device="cpu", num_beams=2, min_length=3, max_length=8))
    assert isinstance(cap, Captioner)
    out = cap.caption(_images())
    assert len(out) == 3
    allowed = set(WORDS) - {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"}
    for text in out:
        words = text.replace(".", " . ").split()
        assert words and set(words) <= allowed, text
        assert "[" not in text  # special tokens are stripped
    # Batched and one-at-a-time give the same captions (beam search is deterministic).
    assert [cap.caption([img])[0] for img in _images()] == out
    assert cap.caption([]) == []


def test_prompt_conditions_the_caption(blip_dir: Path) -> None:
    cap = load_blip(BlipOptions(model=str(blip_dir), device="cpu", prompt="a photo of", min_length=2, max_length=10))
    for text in cap.caption(_images()[:2]):
        assert text.startswith("a photo of")


def test_sampling_and_lengths(blip_dir: Path) -> None:
    import torch

    cap = load_blip(BlipOptions(model=str(blip_dir), device="cpu", sample=True, top_p=0.8, min_length=4, max_length=6))
    kw = cap.generate_kwargs()
    assert kw["do_sample"] is True and kw["top_p"] == 0.8 and kw["max_length"] == 6
    torch.manual_seed(0)
    out = cap.caption(_images())
    # max_length counts the [DEC] start token, which decoding drops.
    assert all(1 <= len(t.replace(".", " . ").split()) <= 5 for t in out), out


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="min_length"):
        BlipOptions(min_length=10, max_length=5)
    with pytest.raises(ConfigError, match="num_beams"):
        BlipOptions(num_beams=0)


def test_missing_hub_weights_name_the_folder_to_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))
    assert resolve_blip_source("large") == "Salesforce/blip-image-captioning-large"
    # An id that no Hugging Face cache holds takes the same path as a missing base/large.
    with pytest.raises(ModelLoadError) as e:
        load_blip(BlipOptions(model="lora-trainer-tests/blip-never-downloaded", device="cpu"))
    msg = str(e.value)
    assert "\n" not in msg
    assert "https://huggingface.co/lora-trainer-tests/blip-never-downloaded" in msg
    assert str(tmp_path / "cache" / "models" / "blip-never-downloaded") in msg
    assert "--blip-model PATH" in msg


def test_weights_put_where_the_message_says_are_found(blip_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))
    shutil.copytree(blip_dir, models_dir() / "blip-image-captioning-base")
    assert resolve_blip_source("base") == str(models_dir() / "blip-image-captioning-base")
    assert len(load_blip(BlipOptions(model="base", device="cpu", max_length=6)).caption(_images()[:1])) == 1


def test_folder_without_weights_names_the_path(tmp_path: Path) -> None:
    empty = tmp_path / "my blip"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="my blip.*--blip-model"):
        load_blip(BlipOptions(model=str(empty), device="cpu"))
    with pytest.raises(ModelLoadError, match="nowhere"):
        load_blip(BlipOptions(model=str(tmp_path / "nowhere"), device="cpu"))


def test_function_captioner_adapts_a_host_interrogator() -> None:
    seen = []

    def interrogate(img: Image.Image) -> str:
        seen.append(img.size)
        return f"  a picture {img.size[0]}  "

    cap = FunctionCaptioner(interrogate)
    assert isinstance(cap, Captioner)
    assert cap.caption(_images()[:2]) == ["a picture 40", "a picture 64"]
    assert seen == [(40, 50), (64, 32)]


def test_webui_interrogator_loads_and_unloads_even_on_error() -> None:
    """A WebUI's interrogator (the shape of A1111's ``shared.interrogator``) is loaded under the
    host's queue for a batch and sent back afterwards, also when a caption fails; a load that
    fails becomes one line."""
    import contextlib

    from lora_trainer.hosts.webui import InterrogatorCaptioner

    calls = []

    class Host:
        @contextlib.contextmanager
        def queue(self):
            calls.append("lock")
            try:
                yield
            finally:
                calls.append("unlock")

    class FakeInterrogator:
        def load(self) -> None:
            calls.append("load")

        def generate_caption(self, img: Image.Image) -> str:
            if img.width == 64:
                raise RuntimeError("out of memory")
            return "a red square"

        def unload(self) -> None:
            calls.append("unload")

    cap = InterrogatorCaptioner(Host(), FakeInterrogator())
    assert isinstance(cap, Captioner) and cap.caption(_images()[:1]) == ["a red square"]
    assert calls == ["lock", "load", "unload", "unlock"]
    with pytest.raises(RuntimeError):
        cap.caption(_images()[:2])
    assert calls[4:] == ["lock", "load", "unload", "unlock"]

    class NoModel(FakeInterrogator):
        def load(self) -> None:
            raise FileNotFoundError("model_base_caption_capfilt_large.pth")

    with pytest.raises(ModelLoadError, match=r"^the WebUI's BLIP interrogator could not load its models "
                                             r"\(FileNotFoundError: model_base"):
        InterrogatorCaptioner(Host(), NoModel()).caption(_images()[:1])

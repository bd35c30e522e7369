"""CLIP interrogation with a tiny open_clip model built from config: term lists, cache, weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.caption import clip as clipmod
from lora_trainer.caption.clip import TERM_LISTS, ClipOptions, load_clip, load_term_list, resolve_clip
from lora_trainer.errors import ConfigError, ModelLoadError
from tests.caption_models import TINY_CLIP_CFG, save_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (48, 40), c) for c in ((250, 10, 10), (10, 10, 250), (128, 128, 128))]


def test_shipped_lists_are_real_term_lists() -> None:
    for name in TERM_LISTS:
        terms = load_term_list(name)
        assert len(terms) >= 30, name
        assert len(set(terms)) == len(terms)
        assert not any(t.startswith("#") or "," in t for t in terms), name
    assert "oil painting" in load_term_list("medium")
    assert "golden hour" in load_term_list("lighting")


def test_own_list_file_and_unknown_list(tmp_path: Path) -> None:
    own = tmp_path / "mine.txt"
    own.write_text("# mine\nfoo\n\nbar\nfoo\n", encoding="utf-8")
    assert load_term_list(str(own)) == ["foo", "bar"]
    with pytest.raises(ConfigError, match="medium"):
        load_term_list("no-such-list")


def test_rank_appends_terms_from_the_shipped_lists(clip_dir: Path, cache: Path) -> None:
    opts = ClipOptions(model=str(clip_dir), device="cpu", top_k=2, min_score=-1.0)
    clip = load_clip(opts)
    ranked = clip.rank(_images())
    assert len(ranked) == 3
    for per_image in ranked:
        assert list(per_image) == list(TERM_LISTS)
        for name, kept in per_image.items():
            assert len(kept) == 2
            assert kept[0][1] >= kept[1][1]
            assert all(term in load_term_list(name) for term, _ in kept)
    captions = clip.caption(_images())
    assert [len(c.split(", ")) for c in captions] == [12, 12, 12]
    # The ranking is the model's: scores equal cosine similarity computed by hand.
    import torch

    terms, emb = clip.term_embeddings("medium")
    with torch.no_grad():
        img = clip.model.encode_image(torch.stack([clip.preprocess(_images()[0])]))
        txt = clip.model.encode_text(clip.tokenizer(terms))
    sims = torch.nn.functional.cosine_similarity(img, txt)
    assert ranked[0]["medium"][0][0] == terms[int(sims.argmax())]
    assert ranked[0]["medium"][0][1] == pytest.approx(float(sims.max()), abs=1e-5)


def test_min_score_filters_terms(clip_dir: Path, cache: Path) -> None:
    clip = load_clip(ClipOptions(model=str(clip_dir), device="cpu", min_score=1.01))
    assert clip.caption(_images()[:1]) == [""]


def test_term_embeddings_cached_on_disk_and_reused(clip_dir: Path, cache: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    opts = ClipOptions(model=str(clip_dir), device="cpu", lists=("lighting",), min_score=-1.0)
    first = load_clip(opts)
    terms, emb = first.term_embeddings("lighting")
    files = list((cache / "clip_terms").glob("lighting-*.safetensors"))
    assert len(files) == 1
    assert not list((cache / "clip_terms").glob(".*tmp"))  # atomic write left no temp file
    second = load_clip(opts)

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("text encoder ran although the cache holds the embeddings")

    monkeypatch.setattr(second.model, "encode_text", boom)
    terms2, emb2 = second.term_embeddings("lighting")
    assert terms2 == terms and emb2.shape == emb.shape
    assert (emb2 - emb).abs().max() < 1e-6


def test_cache_key_changes_with_list_content(clip_dir: Path, cache: Path, tmp_path: Path) -> None:
    own = tmp_path / "own.txt"
    own.write_text("red\nblue\n", encoding="utf-8")
    clip = load_clip(ClipOptions(model=str(clip_dir), device="cpu", lists=(str(own),)))
    clip.term_embeddings(str(own))
    own.write_text("red\nblue\ngreen\n", encoding="utf-8")
    fresh = load_clip(ClipOptions(model=str(clip_dir), device="cpu", lists=(str(own),)))
    terms, emb = fresh.term_embeddings(str(own))
    assert terms == ["red", "blue", "green"] and emb.shape[0] == 3
    assert len(list((cache / "clip_terms").glob("own-*.safetensors"))) == 2


def test_named_architecture_with_weights_file(clip_dir: Path, cache: Path, tmp_path: Path) -> None:
    import open_clip

    cfg_file = tmp_path / "lt-tiny-clip.json"
    cfg_file.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(cfg_file)
    spec = resolve_clip(ClipOptions(model="lt-tiny-clip", weights=str(clip_dir / "open_clip_model.safetensors")))
    assert spec.name == "lt-tiny-clip" and spec.checkpoint.endswith("open_clip_model.safetensors")
    a = load_clip(ClipOptions(model="lt-tiny-clip", weights=spec.checkpoint, device="cpu", min_score=-1.0))
    b = load_clip(ClipOptions(model=str(clip_dir), device="cpu", min_score=-1.0))
    assert a.caption(_images()) == b.caption(_images())  # same weights, same terms


def test_family_picks_the_matching_encoder_and_missing_weights_say_where(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clipmod, "_hf_cached", lambda repo: None)
    monkeypatch.setenv("HOME", str(cache / "home"))
    for family, name, tag in (("sd1", "ViT-L-14", "openai"), ("sd2", "ViT-H-14", "laion2b_s32b_b79k"),
                              ("sdxl", "ViT-L-14", "openai")):
        with pytest.raises(ModelLoadError) as e:
            resolve_clip(ClipOptions(family=family))
        msg = str(e.value)
        assert f"{name} ({tag})" in msg and "--clip-weights PATH" in msg and "\n" not in msg
        assert str(cache / "models" / "clip" / f"{name}-{tag}.safetensors") in msg
    with pytest.raises(ModelLoadError, match="ViT-bigG-14 \\(laion2b_s39b_b160k\\)"):
        resolve_clip(ClipOptions(model="ViT-bigG-14", family="sdxl"))
    with pytest.raises(ModelLoadError, match="nothing-here.pt"):
        resolve_clip(ClipOptions(model="ViT-L-14", weights=str(cache / "nothing-here.pt")))
    with pytest.raises(ConfigError, match="not an open_clip model"):
        resolve_clip(ClipOptions(model="ViT-Q-99"))


def test_weights_put_where_the_message_says_are_found(clip_dir: Path, cache: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.setattr(clipmod, "_hf_cached", lambda repo: None)
    target = cache / "models" / "clip" / "ViT-L-14-openai.safetensors"
    target.parent.mkdir(parents=True)
    shutil.copy(clip_dir / "open_clip_model.safetensors", target)
    spec = resolve_clip(ClipOptions(family="sd1"))
    assert spec.checkpoint == str(target) and spec.quick_gelu is True


def test_folder_without_weights(tmp_path: Path) -> None:
    folder = tmp_path / "clip-no-weights"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG}))
    with pytest.raises(ModelLoadError, match="clip-no-weights.*open_clip_model.safetensors"):
        resolve_clip(ClipOptions(model=str(folder)))

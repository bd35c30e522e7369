"""The torch-side dataset (deterministic plans, resume positions) and the latent cache keys."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from lora_trainer.config import build_config
from lora_trainer.data.cache import LatentCache, TextCache, fill_latent_cache, module_identity
from lora_trainer.data.dataset import BucketDataset, EpochView
from lora_trainer.data.scan import scan_dataset
from tests.train_helpers import make_data, tiny_bundle


def _cfg(data: Path, **values):
    base = {"data.train_data_dir": str(data), "data.resolution": 64, "data.enable_buckets": False,
            "data.min_image_size": 32}
    base.update(values)
    return build_config(base)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"), n=5)


def test_plan_is_deterministic_and_covers_repeats(data: Path) -> None:
    cfg = _cfg(data, **{"data.repeats": 3, "data.flip": True})
    items = scan_dataset(cfg.data).items
    ds = BucketDataset(items, cfg.data, batch_size=2, seed=7)
    plan0 = ds.plan(0)
    again = BucketDataset(items, cfg.data, batch_size=2, seed=7).plan(0)
    assert plan0 == again
    assert ds.plan(1) != plan0  # a new order every epoch
    assert BucketDataset(items, cfg.data, batch_size=2, seed=8).plan(0) != plan0
    flat = [e.index for batch in plan0 for e in batch]
    assert sorted(flat) == sorted(list(range(5)) * 3)
    assert all(len({e.bucket for e in batch}) == 1 for batch in plan0)
    assert {e.flip for batch in plan0 for e in batch} == {True, False}


def test_captions_are_fixed_only_without_shuffle_and_tag_dropout(data: Path) -> None:
    """The text encoder's outputs are cached only for captions that never change: tag dropout
    (like shuffling) changes them every step."""
    items = scan_dataset(_cfg(data).data).items

    def fixed(**values):
        return BucketDataset(items, _cfg(data, **values).data, batch_size=2, seed=7).fixed_captions()

    assert fixed() is not None and fixed(**{"data.caption_dropout": 0.1})[0] == ""
    assert fixed(**{"data.tag_dropout": 0.1}) is None and fixed(**{"data.shuffle_captions": True}) is None


def test_fixed_captions_are_the_captions_steps_train_with(data: Path) -> None:
    """Text embeddings are cached from fixed_captions(): with a caption prefix/suffix, the trigger
    word and kohya's separators they must be exactly the captions the batches carry."""
    cfg = _cfg(data, **{"data.caption_prefix": "art,", "data.caption_suffix": ", flat", "data.trigger_word": "sks",
                        "data.keep_tokens_separator": "|||", "data.secondary_separator": ";;;"})
    items = [dataclasses.replace(it, caption=it.caption + (" ||| big;;;bold" if i % 2 else ""))
             for i, it in enumerate(scan_dataset(cfg.data).items)]
    ds = BucketDataset(items, cfg.data, batch_size=2, seed=7)
    seen = {c for b in ds.plan(0) for c in ds.load_batch(b).captions}
    assert sorted(seen) == ds.fixed_captions()
    assert all(c.startswith("sks, art, ") and c.endswith(", flat") and "|" not in c and ";" not in c for c in seen)
    assert any(c.endswith("background, big, bold, flat") for c in seen)


def test_wildcard_captions_are_cached_as_every_expansion_or_not_at_all(data: Path) -> None:
    """With enable_wildcard, captions change per draw: fixed_captions() lists every expansion
    (what the batches carry over epochs) while they are few, and is None past the limit (the
    text is then encoded each step); off, the braces and lines are one literal caption."""
    cfg = _cfg(data, **{"data.enable_wildcard": True, "data.trigger_word": "sks"})
    base = scan_dataset(cfg.data).items
    wild = [dataclasses.replace(it, caption=f"{{red|blue}} {it.caption}\nline two" if i == 0 else it.caption)
            for i, it in enumerate(base)]
    ds = BucketDataset(wild, cfg.data, batch_size=2, seed=7)
    seen = {c for epoch in range(12) for b in ds.plan(epoch) for c in ds.load_batch(b).captions}
    fixed = ds.fixed_captions()
    assert fixed is not None and sorted(seen) == fixed and len(fixed) == len(base) + 2
    assert {f"sks, red {base[0].caption}", f"sks, blue {base[0].caption}", "sks, line two"} <= seen
    off = BucketDataset(wild, _cfg(data, **{"data.trigger_word": "sks"}).data, batch_size=2, seed=7).fixed_captions()
    assert off is not None and f"sks, {{red|blue}} {base[0].caption}\nline two" in off and len(off) == len(base)
    many = [dataclasses.replace(it, caption="{a|b}" * 10) for it in base]  # 1024 ways each
    assert BucketDataset(many, cfg.data, batch_size=2, seed=7).fixed_captions() is None
    assert BucketDataset(many, _cfg(data).data, batch_size=2, seed=7).fixed_captions() == ["{a|b}" * 10]


def test_caption_dropout_every_n_epochs_empties_whole_epochs(data: Path) -> None:
    """caption_dropout_every_n_epochs: 2 trains epochs 2 and 4 (kohya counts from 1; plan(1) and
    plan(3) here) on empty captions and epochs 1 and 3 on their
    captions; the epoch comes from the plan, and the text cache holds "" as well."""
    cfg = _cfg(data, **{"data.caption_dropout_every_n_epochs": 2, "data.trigger_word": "sks"})
    ds = BucketDataset(scan_dataset(cfg.data).items, cfg.data, batch_size=2, seed=7)

    def captions(epoch: int) -> list[str]:
        return [c for b in ds.plan(epoch) for c in ds.load_batch(b).captions]

    assert all(c == "" for e in (1, 3) for c in captions(e))
    assert all(c.startswith("sks, ") for e in (0, 2) for c in captions(e))
    assert ds.fixed_captions()[0] == "" and "" not in BucketDataset(
        ds.items, _cfg(data).data, batch_size=2, seed=7).fixed_captions()
    tail = [c for b in EpochView(ds, 3, start=1) for c in b.captions]  # a resume inside a dropped epoch
    assert tail and all(c == "" for c in tail)


def test_epoch_view_resumes_at_a_position(data: Path) -> None:
    cfg = _cfg(data, **{"data.shuffle_captions": True, "data.flip": True})
    ds = BucketDataset(scan_dataset(cfg.data).items, cfg.data, batch_size=2, seed=1)
    full = [b for b in EpochView(ds, 0)]
    tail = [b for b in EpochView(ds, 0, start=1)]
    assert len(tail) == len(full) - 1
    for a, b in zip(full[1:], tail, strict=True):
        assert a.captions == b.captions and torch.equal(a.pixels, b.pixels)
    assert full[0].pixels.shape[1:] == (3, 64, 64)
    assert full[0].pixels.min() >= -1 and full[0].pixels.max() <= 1


def test_regularization_images_are_interleaved_with_their_weight(tmp_path: Path, data: Path) -> None:
    from lora_trainer.data.demo import draw_item

    reg = tmp_path / "reg"
    reg.mkdir()
    for i in (20, 21):  # other drawings than the training set's (duplicates would be skipped)
        img, caption = draw_item(i)
        img.save(reg / f"class_{i}.png")
        (reg / f"class_{i}.txt").write_text(caption)
    cfg = _cfg(data, **{"data.reg_data_dir": str(reg), "data.prior_loss_weight": 0.5})
    ds = BucketDataset(scan_dataset(cfg.data).items, cfg.data, batch_size=1, seed=0)
    batches = [ds.load_batch(b) for b in ds.plan(0)]
    weights = [float(b.weights[0]) for b in batches]
    assert weights.count(0.5) == weights.count(1.0) == 5  # as many reg samples as training samples
    assert weights != sorted(weights)  # mixed in, not appended


def test_latent_cache_hits_and_misses(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", n=2)
    bundle = tiny_bundle("sd1")
    cfg = _cfg(data)
    vae_id = module_identity(bundle.vae, "sd1")

    def fill(cfg, vae_id: str = vae_id) -> LatentCache:
        ds = BucketDataset(scan_dataset(cfg.data).items, cfg.data, 1, 0)
        cache = LatentCache("disk", vae_id, cfg.data.crop, tmp_path / "cache")
        fill_latent_cache(ds, cache, bundle, 2)
        ds.latent_cache = cache
        batch = ds.load_batch(ds.plan(0)[0])
        assert batch.latents is not None and batch.pixels is None
        assert batch.latents.shape == (1, 4, batch_size_side(cfg), batch_size_side(cfg))
        return cache

    def batch_size_side(cfg) -> int:
        return cfg.data.resolution // 8

    first = fill(cfg)
    assert (first.hits, first.misses) == (0, 2)
    same = fill(cfg)
    assert (same.hits, same.misses) == (2, 0)
    # changed image bytes -> that image misses
    from lora_trainer.data.demo import draw_item

    draw_item(5)[0].save(data / "demo_000.png")
    changed = fill(cfg)
    assert (changed.hits, changed.misses) == (1, 1)
    # another bucket (resolution) -> all miss
    other = fill(_cfg(data, **{"data.resolution": 128}))
    assert (other.hits, other.misses) == (0, 2)
    # another VAE -> all miss
    with torch.no_grad():
        next(bundle.vae.parameters()).add_(0.01)
    new_id = module_identity(bundle.vae, "sd1")
    assert new_id != vae_id
    assert fill(cfg, new_id).misses == 2
    # flips are cached as well: two variants per image
    flipped = fill(_cfg(data, **{"data.flip": True}), new_id)
    assert (flipped.hits, flipped.misses) == (2, 2)


def test_cached_latents_equal_freshly_encoded_ones(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", n=1)
    bundle = tiny_bundle("sd1")
    cfg = _cfg(data)
    ds = BucketDataset(scan_dataset(cfg.data).items, cfg.data, 1, 0)
    entry = ds.plan(0)[0]
    fresh = ds.load_batch(entry)
    cache = LatentCache("memory", module_identity(bundle.vae), "center")
    torch.manual_seed(0)  # the VAE samples its latent distribution
    fill_latent_cache(ds, cache, bundle, 1)
    ds.latent_cache = cache
    cached = ds.load_batch(entry)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = bundle.encode_images(fresh.pixels)
    assert torch.allclose(cached.latents, expected, atol=1e-6)
    assert cached.captions == fresh.captions and torch.equal(cached.size_info, fresh.size_info)


def test_text_cache_matches_the_encoder(tmp_path: Path) -> None:
    bundle = tiny_bundle("sdxl")
    cache = TextCache(bundle.encode_text, ["a cat", "a dog", ""])
    with torch.no_grad():
        direct = bundle.encode_text(["a dog", "a cat"])
    got = cache.get(["a dog", "a cat"])
    assert got.keys() == direct.keys() and "pooled" in got
    for k in got:
        assert torch.allclose(got[k], direct[k], atol=1e-6)


def test_worker_processes_load_the_same_batches(data: Path) -> None:
    from lora_trainer.train.session import _identity

    cfg = _cfg(data, **{"data.flip": True, "data.caption_dropout": 0.5})
    ds = BucketDataset(scan_dataset(cfg.data).items, cfg.data, batch_size=2, seed=3)
    here = list(EpochView(ds, 1, start=1))
    loader = torch.utils.data.DataLoader(EpochView(ds, 1, start=1), batch_size=None, num_workers=1,
                                         collate_fn=_identity)
    there = list(loader)
    assert len(here) == len(there) > 0
    for a, b in zip(here, there, strict=True):
        assert a.captions == b.captions and a.entries == b.entries and torch.equal(a.pixels, b.pixels)


def _half_transparent(folder: Path, size: tuple[int, int], edge: int) -> Path:
    """One RGBA image, transparent left of column ``edge`` (white once flattened) and opaque black
    right of it, with its caption."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    w, h = size
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[:, edge:, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(folder / "a.png")
    (folder / "a.txt").write_text("logo", encoding="utf-8")
    return folder


def test_alpha_masks_follow_the_flip(tmp_path: Path) -> None:
    """Transparent left half: the mask's zeros are on the left, and on the right once flipped."""
    data = _half_transparent(tmp_path / "d", (64, 64), 32)
    cfg = _cfg(data, **{"data.alpha_mask": True})
    ds = BucketDataset(scan_dataset(cfg.data).items, cfg.data, 1, 0)
    plain, _, plain_mask = ds.load_sample(0, (64, 64), False, random.Random(0), mask=True)
    _, _, flipped = ds.load_sample(0, (64, 64), True, random.Random(0), mask=True)
    assert plain_mask.shape == flipped.shape == (1, 8, 8)
    assert torch.equal(plain_mask[0, :, :4], torch.zeros(8, 4)) and torch.equal(plain_mask[0, :, 4:], torch.ones(8, 4))
    assert torch.equal(flipped, plain_mask.flip(-1))
    assert (plain[:, :, :32] == 1).all()  # the transparent half is white in the pixels


@pytest.mark.parametrize("flip", [False, True])
def test_alpha_masks_are_cropped_where_the_pixels_are(tmp_path: Path, flip: bool) -> None:
    """Random crops of a wide image, flipped or not: every batch's mask is the area average of
    where its own pixels are opaque (black), at the latents' size, fractions included."""
    data = _half_transparent(tmp_path / "d", (160, 64), 77)
    cfg = _cfg(data, **{"data.alpha_mask": True, "data.crop": "random", "data.flip": flip, "data.repeats": 6})
    ds = BucketDataset(scan_dataset(cfg.data).items, cfg.data, 2, 3)
    lefts = set()
    for entries in ds.plan(0):
        batch = ds.load_batch(entries)
        assert batch.masks is not None and batch.masks.shape == (len(entries), 1, 8, 8)
        opaque = (batch.pixels[:, :1] < 0).float()
        expected = torch.nn.functional.avg_pool2d(opaque, 8)
        assert torch.allclose(batch.masks, expected, atol=0.02), (entries, batch.masks, expected)
        lefts |= {int(v) for v in batch.size_info[:, 3]}
    assert len(lefts) > 2  # the crops really moved


def test_alpha_masks_of_opaque_images_are_ones_and_off_by_default(data: Path) -> None:
    entries = None
    for on in (True, False):
        cfg = _cfg(data, **{"data.alpha_mask": on})
        ds = BucketDataset(scan_dataset(cfg.data).items, cfg.data, 2, 0)
        entries = entries or ds.plan(0)[0]
        batch = ds.load_batch(entries)
        if on:
            assert torch.equal(batch.masks, torch.ones(len(entries), 1, 8, 8))
        else:
            assert batch.masks is None


def test_cached_latents_come_with_the_same_masks(tmp_path: Path) -> None:
    """With latents from the cache (memory or a disk cache written before masks existed) the masks
    are recomputed from the images: equal to the uncached batches' ones."""
    from tests.train_helpers import make_transparent_data

    data = make_transparent_data(tmp_path / "data", n=4)
    bundle = tiny_bundle("sd1")
    cfg = _cfg(data, **{"data.alpha_mask": True, "data.flip": True})
    for mode in ("memory", "disk"):
        ds = BucketDataset(scan_dataset(cfg.data).items, cfg.data, 2, 0)
        fresh = [ds.load_batch(entries) for entries in ds.plan(0)]
        cache = LatentCache(mode, module_identity(bundle.vae), "center", tmp_path / "cache")
        fill_latent_cache(ds, cache, bundle, 1)
        ds = BucketDataset(scan_dataset(cfg.data).items, cfg.data, 2, 0)
        ds.latent_cache = LatentCache(mode, module_identity(bundle.vae), "center", tmp_path / "cache") \
            if mode == "disk" else cache
        for entries, uncached in zip(ds.plan(0), fresh, strict=True):
            batch = ds.load_batch(entries)
            assert batch.latents is not None and batch.pixels is None
            assert torch.equal(batch.masks, uncached.masks)
        assert any(float(b.masks.min()) == 0.0 for b in fresh) and any(bool((m == 1).all()) for b in fresh for m in b.masks)

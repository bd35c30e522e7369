"""The torch side of a dataset: deterministic per-bucket batches with an exact resume position.

The plan of an epoch (which image, flipped or not, in which batch, with which per-sample seed)
is a pure function of (seed, epoch), so a run resumed at (epoch, position) sees exactly the
batches the uninterrupted run would have seen, without saving any data-loader state. Every
random choice for one sample (crop offset, caption shuffle/dropout) comes from that sample's
own seed, for the same reason.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from lora_trainer.config import DataConfig
from lora_trainer.data import buckets, images, text

# With enable_wildcard, how many captions beyond one per image the text cache may hold (every
# expansion is encoded once); past it, captions are encoded each step.
WILDCARD_CACHE_EXTRA = 256


@dataclass(frozen=True)
class Entry:
    """One sample of an epoch's plan."""

    index: int  # into ``BucketDataset.items``
    bucket: tuple[int, int]  # (w, h)
    flip: bool
    seed: int
    epoch: int = 0  # 0-based epoch of the plan it is in: caption_dropout_every_n_epochs reads it from here


@dataclass
class Batch:
    entries: list[Entry]
    captions: list[str]
    weights: torch.Tensor  # (B,) per-sample loss weight (prior_loss_weight for reg images)
    size_info: torch.Tensor  # (B, 6) [orig_h, orig_w, crop_top, crop_left, target_h, target_w]
    pixels: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1], when latents are not cached
    latents: torch.Tensor | None = None  # (B, C, h, w), from the latent cache
    masks: torch.Tensor | None = None  # (B, 1, h, w) loss masks in [0, 1] at the latents' size (alpha_mask, mask_dir)

    def pin_memory(self) -> Batch:
        """The same batch in page-locked memory, so copies to a GPU can overlap its work."""
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return dataclasses.replace(self, weights=pin(self.weights), size_info=pin(self.size_info),
                                   pixels=pin(self.pixels), latents=pin(self.latents), masks=pin(self.masks))


# The VAE's downscale from pixels to latents (8 for every family here); a loss mask is reduced by
# it, and the training step resizes a mask to its latents' size should one differ.
MASK_DOWNSCALE = 8


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float tensor in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class BucketDataset:
    """Items from ``scan_dataset`` -> an epoch plan of same-bucket batches, and the batches."""

    def __init__(self, items: list[Any], data_cfg: DataConfig, batch_size: int, seed: int) -> None:
        self.items = list(items)
        self.cfg = data_cfg
        self.batch_size = batch_size
        self.seed = seed
        self.buckets = [buckets.assign_bucket(it.width, it.height, data_cfg) for it in self.items]
        self.latent_cache: Any = None  # set by the trainer when latents are cached
        self._masks: dict[tuple[int, tuple[int, int], bool], torch.Tensor] = {}  # of fixed crops, by variant
        self._plans: dict[int, list[list[Entry]]] = {}

    # -- planning ------------------------------------------------------------------------
    @property
    def fixed_crop(self) -> bool:
        """True when an image's pixels depend only on (image, bucket, flip): latents are cacheable."""
        return self.cfg.crop == "center" and not self.cfg.color_aug

    @property
    def varying_pixels(self) -> str:
        """What makes an image's pixels differ from use to use ("" when nothing does)."""
        return " and ".join(why for on, why in ((self.cfg.crop == "random", "random crops"),
                                                (self.cfg.color_aug, "color augmentation")) if on)

    def plan(self, epoch: int) -> list[list[Entry]]:
        """The batches of ``epoch``: a pure function of (seed, epoch)."""
        if epoch in self._plans:
            return self._plans[epoch]
        rng = random.Random(f"lora-trainer/{self.seed}/{epoch}")
        train = [i for i, it in enumerate(self.items) if not it.is_reg]
        reg = [i for i, it in enumerate(self.items) if it.is_reg]
        order = [i for i in train for _ in range(max(1, self.items[i].repeats))]
        if reg:
            # As many regularization samples as training samples, cycling through a shuffled
            # copy: the prior-preservation balance kohya users expect.
            reg = reg[:]
            rng.shuffle(reg)
            order += [reg[k % len(reg)] for k in range(len(order))]
        rng.shuffle(order)
        by_bucket: dict[tuple[int, int], list[Entry]] = {}
        for i in order:
            flip = self.cfg.flip and rng.random() < 0.5
            entry = Entry(i, self.buckets[i], flip, rng.getrandbits(32), epoch)
            by_bucket.setdefault(entry.bucket, []).append(entry)
        batches = [group[k:k + self.batch_size] for _, group in sorted(by_bucket.items())
                   for k in range(0, len(group), self.batch_size)]
        rng.shuffle(batches)
        self._plans = {epoch: batches}  # keep one epoch: plans are cheap to rebuild
        return batches

    def batches_per_epoch(self) -> int:
        return len(self.plan(0))

    def variants(self) -> list[tuple[int, tuple[int, int], bool]]:
        """Every (item, bucket, flip) a run can ask for: what the latent cache must hold."""
        flips = (False, True) if self.cfg.flip else (False,)
        return [(i, self.buckets[i], f) for i in range(len(self.items)) for f in flips]

    # -- loading -------------------------------------------------------------------------
    def load_pixels(self, index: int, bucket: tuple[int, int], flip: bool,
                    rng: random.Random) -> tuple[torch.Tensor, list[int]]:
        """(3, H, W) pixels of one item and its SDXL size info row."""
        pixels, size, _ = self.load_sample(index, bucket, flip, rng, mask=False)
        return pixels, size

    def load_sample(self, index: int, bucket: tuple[int, int], flip: bool, rng: random.Random,
                    mask: bool) -> tuple[torch.Tensor, list[int], torch.Tensor | None]:
        """:meth:`load_pixels`, and with ``mask`` the item's loss mask (:meth:`mask_of`), cropped
        with the same offset (drawn from a copy of ``rng``) and flipped like the pixels."""
        item = self.items[index]
        img, alpha = self.open_with_mask(item) if mask else (images.open_image_rgb(item.path), None)
        orig_w, orig_h = img.size
        mask_rng = random.Random()
        mask_rng.setstate(rng.getstate())
        img, (top, left) = buckets.fit_to_bucket(img, bucket, self.cfg.crop, rng)
        if flip:
            # Mirror the crop offset too, as SDXL's crop conditioning describes the flipped image.
            resized_w = max(bucket[0], round(orig_w * max(bucket[0] / orig_w, bucket[1] / orig_h)))
            left = max(0, resized_w - left - bucket[0])
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.cfg.color_aug:
            img = images.color_augment(img, rng)
        loss_mask = self.mask_of(alpha, bucket, flip, mask_rng) if mask else None
        return pil_to_tensor(img), [orig_h, orig_w, top, left, bucket[1], bucket[0]], loss_mask

    def open_with_mask(self, item: Any) -> tuple[Image.Image, Image.Image | None]:
        """An item's RGB image and its mask as an "L" image of the same size: its file in
        data.mask_dir, else its alpha channel (None: none, it trains everywhere)."""
        if getattr(item, "mask", None) is None:
            return images.open_image_and_alpha(item.path)
        img = images.open_image_rgb(item.path)
        return img, images.open_mask(item.mask, img.size)

    def mask_of(self, alpha: Image.Image | None, bucket: tuple[int, int], flip: bool,
                rng: random.Random) -> torch.Tensor:
        """(1, h, w) loss mask in [0, 1] at the latents' size: ``alpha`` (an "L" image the size of
        the item's upright image) resized, cropped and flipped as its pixels are, then averaged
        over each latent pixel's area (kohya's area interpolation). No alpha: all ones."""
        size = (bucket[1] // MASK_DOWNSCALE, bucket[0] // MASK_DOWNSCALE)
        if alpha is None:
            return torch.ones((1, *size), dtype=torch.float32)
        alpha, _ = buckets.fit_to_bucket(alpha, bucket, self.cfg.crop, rng)
        if flip:
            alpha = alpha.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        full = torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0)[None, None]
        return torch.nn.functional.interpolate(full, size=size, mode="area")[0].clamp_(0.0, 1.0)

    def load_mask(self, e: Entry) -> torch.Tensor:
        """The loss mask of a sample whose latents come from the cache (so of a fixed crop):
        recomputed from the image file once, then kept (masks are tiny; the cache's format
        stays as it is)."""
        key = (e.index, e.bucket, e.flip)
        if key not in self._masks:
            _, alpha = self.open_with_mask(self.items[e.index])
            self._masks[key] = self.mask_of(alpha, e.bucket, e.flip, random.Random(e.seed))
        return self._masks[key]

    def caption(self, entry: Entry, rng: random.Random) -> str:
        """The caption of one drawn sample: "" all through the epochs that
        caption_dropout_every_n_epochs drops (numbered from 1 as kohya does; the epoch comes from
        the plan, so a resumed run drops the same ones), else :func:`text.process_caption`."""
        c = self.cfg
        every = c.caption_dropout_every_n_epochs
        if every and (entry.epoch + 1) % every == 0:
            return ""
        return text.process_caption(self.items[entry.index].caption, c.trigger_word, c.shuffle_captions,
                                    c.keep_tokens, c.caption_dropout, rng, c.tag_dropout,
                                    **text.caption_options(c))

    def fixed_captions(self) -> list[str] | None:
        """Every caption a run can use, when captions never change (no shuffle, no tag dropout) or
        only among a few wildcard expansions; else None. Each is what :meth:`caption` returns
        (prefix, suffix and separators applied): text embeddings are cached from these."""
        if self.cfg.shuffle_captions or self.cfg.tag_dropout:
            return None
        texts = self._caption_texts()
        if texts is None:
            return None
        c = self.cfg
        out = {text.process_caption(t, c.trigger_word, False, c.keep_tokens, 0.0, random.Random(0),
                                    **text.caption_options(c))
               for t in texts}
        if c.caption_dropout > 0 or c.caption_dropout_every_n_epochs > 0:
            out.add("")
        return sorted(out)

    def _caption_texts(self) -> list[str] | None:
        """The texts captions are made from: each item's caption, or with wildcards on every
        expansion of each (an expanded text expands to itself); None when they add up to more
        than :data:`WILDCARD_CACHE_EXTRA` beyond one per item (embeddings of them all would be
        too many to keep)."""
        if not self.cfg.enable_wildcard:
            return [it.caption for it in self.items]
        limit = len(self.items) + WILDCARD_CACHE_EXTRA
        out: list[str] = []
        for it in self.items:
            expanded = text.wildcard_expansions(it.caption, limit - len(out))
            if expanded is None:
                return None
            out += expanded
        return out

    def load_batch(self, entries: list[Entry]) -> Batch:
        """Latents from the cache when every entry is cached there, else pixels."""
        cached = [self.latent_cache.get(self, e) for e in entries] if self.latent_cache is not None else []
        use_cache = bool(cached) and all(c is not None for c in cached)
        want_masks = self.cfg.alpha_mask or bool(self.cfg.mask_dir)
        pixels, sizes, masks = [], [], []
        for n, e in enumerate(entries):
            if use_cache:
                sizes.append(cached[n][1])
                if want_masks:
                    masks.append(self.load_mask(e))
            else:
                px, size, mask = self.load_sample(e.index, e.bucket, e.flip, random.Random(e.seed), want_masks)
                pixels.append(px)
                sizes.append(size)
                masks.append(mask)
        # Captions draw from their own stream so cached and uncached runs see the same ones.
        captions = [self.caption(e, random.Random(e.seed ^ 0x5EED)) for e in entries]
        weights = [self.cfg.prior_loss_weight if self.items[e.index].is_reg else 1.0 for e in entries]
        return Batch(
            entries=entries, captions=captions, weights=torch.tensor(weights, dtype=torch.float32),
            size_info=torch.tensor(sizes, dtype=torch.float32),
            pixels=None if use_cache else torch.stack(pixels),
            latents=torch.stack([c[0] for c in cached]) if use_cache else None,
            masks=torch.stack(masks) if want_masks else None,
        )


class EpochView(torch.utils.data.Dataset):
    """Map-style view of one epoch's batches from ``start``, so a DataLoader's workers can load them."""

    def __init__(self, ds: BucketDataset, epoch: int, start: int = 0) -> None:
        self.ds, self.batches = ds, ds.plan(epoch)[start:]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Batch:
        return self.ds.load_batch(self.batches[i])


def steps_per_epoch(ds: BucketDataset, grad_accum: int) -> int:
    return max(1, math.ceil(ds.batches_per_epoch() / grad_accum))

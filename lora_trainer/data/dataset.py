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


@dataclass(frozen=True)
class Entry:
    """One sample of an epoch's plan."""

    index: int  # into ``BucketDataset.items``
    bucket: tuple[int, int]  # (w, h)
    flip: bool
    seed: int


@dataclass
class Batch:
    entries: list[Entry]
    captions: list[str]
    weights: torch.Tensor  # (B,) per-sample loss weight (prior_loss_weight for reg images)
    size_info: torch.Tensor  # (B, 6) [orig_h, orig_w, crop_top, crop_left, target_h, target_w]
    pixels: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1], when latents are not cached
    latents: torch.Tensor | None = None  # (B, C, h, w), from the latent cache

    def pin_memory(self) -> Batch:
        """The same batch in page-locked memory, so copies to a GPU can overlap its work."""
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return dataclasses.replace(self, weights=pin(self.weights), size_info=pin(self.size_info),
                                   pixels=pin(self.pixels), latents=pin(self.latents))


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
        self._plans: dict[int, list[list[Entry]]] = {}

    # -- planning ------------------------------------------------------------------------
    @property
    def fixed_crop(self) -> bool:
        """True when an image's pixels depend only on (image, bucket, flip): latents are cacheable."""
        return self.cfg.crop == "center"

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
            entry = Entry(i, self.buckets[i], flip, rng.getrandbits(32))
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
        item = self.items[index]
        img = images.open_image_rgb(item.path)
        orig_w, orig_h = img.size
        img, (top, left) = buckets.fit_to_bucket(img, bucket, self.cfg.crop, rng)
        if flip:
            # Mirror the crop offset too, as SDXL's crop conditioning describes the flipped image.
            resized_w = max(bucket[0], round(orig_w * max(bucket[0] / orig_w, bucket[1] / orig_h)))
            left = max(0, resized_w - left - bucket[0])
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_tensor(img), [orig_h, orig_w, top, left, bucket[1], bucket[0]]

    def caption(self, entry: Entry, rng: random.Random) -> str:
        c = self.cfg
        return text.process_caption(self.items[entry.index].caption, c.trigger_word, c.shuffle_captions,
                                    c.keep_tokens, c.caption_dropout, rng, c.tag_dropout,
                                    **text.caption_options(c))

    def fixed_captions(self) -> list[str] | None:
        """Every caption a run can use, when captions never change (no shuffle, no tag dropout);
        else None. Each is what :meth:`caption` returns (prefix, suffix and separators applied):
        text embeddings are cached from these."""
        if self.cfg.shuffle_captions or self.cfg.tag_dropout:
            return None
        c = self.cfg
        out = {text.process_caption(it.caption, c.trigger_word, False, c.keep_tokens, 0.0, random.Random(0),
                                    **text.caption_options(c))
               for it in self.items}
        if c.caption_dropout > 0:
            out.add("")
        return sorted(out)

    def load_batch(self, entries: list[Entry]) -> Batch:
        """Latents from the cache when every entry is cached there, else pixels."""
        cached = [self.latent_cache.get(self, e) for e in entries] if self.latent_cache is not None else []
        use_cache = bool(cached) and all(c is not None for c in cached)
        pixels, sizes = [], []
        for n, e in enumerate(entries):
            if use_cache:
                sizes.append(cached[n][1])
            else:
                px, size = self.load_pixels(e.index, e.bucket, e.flip, random.Random(e.seed))
                pixels.append(px)
                sizes.append(size)
        # Captions draw from their own stream so cached and uncached runs see the same ones.
        captions = [self.caption(e, random.Random(e.seed ^ 0x5EED)) for e in entries]
        weights = [self.cfg.prior_loss_weight if self.items[e.index].is_reg else 1.0 for e in entries]
        return Batch(
            entries=entries, captions=captions, weights=torch.tensor(weights, dtype=torch.float32),
            size_info=torch.tensor(sizes, dtype=torch.float32),
            pixels=None if use_cache else torch.stack(pixels),
            latents=torch.stack([c[0] for c in cached]) if use_cache else None,
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

"""Latent and text-embedding caches.

Latents are keyed by sha256(file bytes) + bucket + crop mode + flip + the VAE's identity (a hash
of its weights, dtype and config), so a changed image, a different bucket or another VAE is a
cache miss and a stale latent is never used. With random crops the latents are not a function
of the image and are not cached; with flip on, both orientations are cached (twice the VAE work
once, instead of losing the cache).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lora_trainer.data.dataset import BucketDataset, Entry
from lora_trainer.fsutil import atomic_path

log = logging.getLogger(__name__)

CACHE_FORMAT = "1"  # bump when the cached content changes meaning


def module_identity(module: torch.nn.Module | None, extra: str = "") -> str:
    """sha256 over a module's parameter/buffer names, dtypes, shapes and bytes (plus ``extra``)."""
    h = hashlib.sha256(extra.encode())
    if module is not None:
        h.update(repr(getattr(module, "config", "")).encode())
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """{key: (latents (C, h, w) fp32 on CPU, size_info row)} in memory or as .safetensors files."""

    def __init__(self, mode: str, vae_id: str, crop: str, cache_dir: Path | None = None) -> None:
        if mode not in ("memory", "disk"):
            raise ValueError(f"latent cache mode {mode!r}")
        if mode == "disk" and cache_dir is None:
            raise ValueError("a disk latent cache needs a folder")
        self.mode, self.vae_id, self.crop, self.cache_dir = mode, vae_id, crop, cache_dir
        self._mem: dict[str, tuple[torch.Tensor, list[float]]] = {}
        self.hits = 0
        self.misses = 0

    def key(self, ds: BucketDataset, index: int, bucket: tuple[int, int], flip: bool) -> str:
        digest = ds.items[index].digest
        raw = f"{CACHE_FORMAT}|{digest}|{bucket[0]}x{bucket[1]}|{self.crop}|{int(flip)}|{self.vae_id}"
        return hashlib.sha256(raw.encode()).hexdigest()

    def _file(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{key}.safetensors"

    def lookup(self, key: str) -> tuple[torch.Tensor, list[float]] | None:
        if key in self._mem:
            return self._mem[key]
        if self.mode == "disk" and self._file(key).is_file():
            try:
                t = load_file(str(self._file(key)))
            except Exception:  # noqa: BLE001 - a damaged cache file is only a miss
                log.warning("latent cache file %s is unreadable; encoding again", self._file(key))
                return None
            value = (t["latents"], t["size_info"].tolist())
            self._mem[key] = value  # disk files are read once per run
            return value
        return None

    def put(self, key: str, latents: torch.Tensor, size_info: list[float]) -> None:
        latents = latents.detach().to("cpu", torch.float32).contiguous()
        if self.mode == "disk":
            with atomic_path(self._file(key)) as tmp:
                save_file({"latents": latents, "size_info": torch.tensor(size_info, dtype=torch.float32)},
                          str(tmp), metadata={"format": CACHE_FORMAT})
        self._mem[key] = (latents, list(size_info))

    def get(self, ds: BucketDataset, e: Entry) -> tuple[torch.Tensor, list[float]] | None:
        return self.lookup(self.key(ds, e.index, e.bucket, e.flip))


# Images the VAE encodes at once while filling the latent cache. One: the encoder's activations
# at full resolution are large (2.5 GiB per 1024px image for SDXL's fp32 VAE) and sit on top of
# the whole model, so a bigger batch would set the run's peak for almost no speed.
LATENT_CACHE_BATCH = 1


@torch.no_grad()
def fill_latent_cache(ds: BucketDataset, cache: LatentCache, bundle: Any, batch_size: int) -> None:
    """Encode every (image, bucket, flip) the run can ask for that the cache lacks."""
    todo: dict[tuple[int, int], list[tuple[str, int, bool]]] = {}
    for index, bucket, flip in ds.variants():
        key = cache.key(ds, index, bucket, flip)
        if cache.lookup(key) is not None:
            cache.hits += 1
        else:
            cache.misses += 1
            todo.setdefault(bucket, []).append((key, index, flip))
    for bucket, jobs in todo.items():
        for k in range(0, len(jobs), batch_size):
            chunk = jobs[k:k + batch_size]
            loaded = [ds.load_pixels(i, bucket, f, random.Random(0)) for _, i, f in chunk]
            pixels = torch.stack([p for p, _ in loaded]).to(bundle.device, bundle.dtype)
            latents = bundle.encode_images(pixels)
            for (key, _, _), lat, (_, size) in zip(chunk, latents, loaded, strict=True):
                cache.put(key, lat, size)
    log.debug("latent cache: %d reused, %d encoded", cache.hits, cache.misses)


class TextCache:
    """Conditioning of every fixed caption, computed once while the text encoders are frozen."""

    def __init__(self, encode: Callable[[list[str]], dict[str, torch.Tensor]], captions: list[str],
                 chunk: int = 16) -> None:
        self._cond: dict[str, dict[str, torch.Tensor]] = {}
        self.add(encode, captions, chunk)

    @torch.no_grad()
    def add(self, encode: Callable[[list[str]], dict[str, torch.Tensor]], captions: list[str], chunk: int = 16) -> None:
        """Encode the ``captions`` not cached yet with ``encode`` (a bundle's encode_text or encode_weighted)."""
        todo = [c for c in dict.fromkeys(captions) if c not in self._cond]
        for k in range(0, len(todo), chunk):
            part = todo[k:k + chunk]
            cond = encode(part)
            for n, c in enumerate(part):
                self._cond[c] = {name: t[n:n + 1].detach() for name, t in cond.items()}

    def __contains__(self, caption: str) -> bool:
        return caption in self._cond

    def get(self, captions: list[str]) -> dict[str, torch.Tensor]:
        rows = [self._cond[c] for c in captions]
        return {name: torch.cat([r[name] for r in rows]) for name in rows[0]}

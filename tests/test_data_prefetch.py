"""Batches loaded ahead in a background thread: same order, errors where they belong, clean stop."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lora_trainer.data.prefetch import THREAD_NAME, prefetch
from tests.train_helpers import TinyHost, lora_tensors, make_data, tiny_config


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def test_items_come_in_order_and_are_prepared_in_the_background() -> None:
    where: list[str] = []

    def prepare(x: int) -> int:
        where.append(threading.current_thread().name)
        return x * 10

    assert list(prefetch(range(7), depth=2, prepare=prepare)) == [0, 10, 20, 30, 40, 50, 60]
    assert set(where) == {THREAD_NAME}
    assert list(prefetch(range(3), depth=0, prepare=prepare)) == [0, 10, 20]
    assert where[-1] == threading.current_thread().name  # depth 0 loads in the caller's thread


def test_the_next_items_load_while_the_consumer_works_on_one() -> None:
    produced = [threading.Event() for _ in range(4)]

    def source() -> Iterator[int]:
        for i in range(4):
            produced[i].set()
            yield i

    items = prefetch(source(), depth=2)
    assert next(items) == 0
    # Still holding item 0, the thread has already loaded items 1 and 2 (the depth).
    assert produced[1].wait(300) and produced[2].wait(300)  # the timeouts only catch a hang
    assert list(items) == [1, 2, 3]


def test_a_loading_error_is_raised_at_its_item() -> None:
    def source() -> Iterator[int]:
        yield 0
        yield 1
        raise ValueError("data/broken.png cannot be read; re-save it")

    items = prefetch(source(), depth=3)
    assert [next(items), next(items)] == [0, 1]
    with pytest.raises(ValueError, match="broken.png"):
        next(items)
    assert not prefetch_threads()


def test_closing_stops_the_thread_and_closes_the_source() -> None:
    closed = threading.Event()

    def endless() -> Iterator[int]:
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    with contextlib.closing(prefetch(endless(), depth=2)) as items:
        assert next(items) == 0
        assert prefetch_threads()
    assert closed.wait(300)
    assert not prefetch_threads()


def test_a_prefetched_run_trains_on_exactly_the_same_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_trainer.data.dataset import BucketDataset
    from lora_trainer.train.trainer import Trainer

    data = make_data(tmp_path / "data", n=4)
    loaded_in: list[str] = []
    original = BucketDataset.load_batch

    def recording(self, entries):  # noqa: ANN001, ANN202
        loaded_in.append(threading.current_thread().name)
        return original(self, entries)

    monkeypatch.setattr(BucketDataset, "load_batch", recording)
    # Uncached pixels with random crops and flips: the loading work a thread takes over.
    values = {"train.max_train_steps": 5, "data.cache_latents": "off", "data.flip": True,
              "data.crop": "random", "output.save_step_loras": False}
    runs = {}
    for depth in (0, 2, None):  # None: the default, which on a CPU loads in the loop's thread
        extra = {} if depth is None else {"data.prefetch": depth}
        cfg = tiny_config(data, tmp_path / f"out{depth}", **values, **extra)
        loaded_in.clear()
        runs[depth] = lora_tensors(Trainer(cfg, host=TinyHost("sd1")).run().lora_path)
        assert set(loaded_in) == ({THREAD_NAME} if depth else {threading.current_thread().name}), loaded_in
    assert runs[0].keys() == runs[2].keys()
    assert all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])
    assert not prefetch_threads()


def test_pinning_a_batch_pins_its_alpha_masks_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch.pin_memory (the prefetch thread's step on CUDA) pins every tensor, the loss masks of
    data.alpha_mask included, so their copy to the card is non-blocking like the latents'."""
    from lora_trainer.data.dataset import Batch, Entry

    pinned: list[tuple[int, ...]] = []

    def fake_pin(t: torch.Tensor) -> torch.Tensor:
        pinned.append(tuple(t.shape))
        return t.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = Batch(entries=[Entry(0, (64, 64), False, 1)], captions=["x"], weights=torch.ones(1),
                  size_info=torch.zeros(1, 6), latents=torch.zeros(1, 4, 8, 8), masks=torch.rand(1, 1, 8, 8))
    out = batch.pin_memory()
    assert (1, 1, 8, 8) in pinned and torch.equal(out.masks, batch.masks) and out.masks is not batch.masks
    assert Batch(entries=[], captions=[], weights=torch.ones(0), size_info=torch.zeros(0, 6)).pin_memory().masks is None

"""Loss masks from a folder (data.mask_dir, kohya's conditioning_data_dir with masked_loss):
found by name, read as kohya reads them, cropped and flipped with their images, and trained
exactly as the same masks from an alpha channel."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import TinyHost, lora_tensors, make_transparent_data, tiny_config

from lora_trainer.config import build_config, load_config
from lora_trainer.data.dataset import BucketDataset
from lora_trainer.data.scan import build_report, scan_dataset
from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.lora.files import read_lora_file


def _cfg(data: Path, **values):
    return build_config({"data.train_data_dir": str(data), "data.resolution": 64, "data.enable_buckets": False,
                         "data.min_image_size": 32, **values})


def _masks_from_alpha(data: Path, masks: Path, scale: float = 1.0) -> Path:
    """Each image's alpha channel as a mask image: in the red channel (green and blue zero, so
    only red can make it work), ``scale`` times the image's size."""
    masks.mkdir(parents=True, exist_ok=True)
    for path in sorted(data.glob("*.png")):
        alpha = np.asarray(Image.open(path).getchannel("A"))
        rgb = np.zeros((*alpha.shape, 3), dtype=np.uint8)
        rgb[..., 0] = alpha
        mask = Image.fromarray(rgb)
        if scale != 1.0:
            mask = mask.resize((round(mask.width * scale), round(mask.height * scale)), Image.Resampling.NEAREST)
        mask.save(masks / f"{path.stem}.png")
    return masks


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_transparent_data(tmp_path_factory.mktemp("masked") / "data", n=4)


def test_masks_from_a_folder_are_the_alpha_masks(data: Path, tmp_path: Path) -> None:
    masks = _masks_from_alpha(data, tmp_path / "masks")
    for flip, crop in [(True, "center"), (True, "random")]:
        by_alpha = _cfg(data, **{"data.alpha_mask": True, "data.flip": flip, "data.crop": crop})
        by_folder = _cfg(data, **{"data.mask_dir": str(masks), "data.flip": flip, "data.crop": crop})
        a = BucketDataset(scan_dataset(by_alpha.data).items, by_alpha.data, 2, 0)
        b = BucketDataset(scan_dataset(by_folder.data).items, by_folder.data, 2, 0)
        for entries in a.plan(0):
            x, y = a.load_batch(entries), b.load_batch(entries)
            assert torch.equal(x.pixels, y.pixels) and torch.equal(x.masks, y.masks)
    assert any(float(b.load_batch(e).masks.min()) == 0.0 for e in b.plan(0))  # not all ones


def test_masks_of_another_size_are_resized_to_their_image(data: Path, tmp_path: Path) -> None:
    masks = _masks_from_alpha(data, tmp_path / "half", scale=0.5)
    exact = _masks_from_alpha(data, tmp_path / "exact")
    got = [BucketDataset(scan_dataset(c.data).items, c.data, 2, 0)
           for c in (_cfg(data, **{"data.mask_dir": str(m)}) for m in (masks, exact))]
    for entries in got[0].plan(0):
        assert torch.allclose(got[0].load_batch(entries).masks, got[1].load_batch(entries).masks, atol=0.1)


def test_masks_are_found_by_path_or_name_and_missing_ones_are_reported(data: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(data, tree / "10_logo")
    masks = _masks_from_alpha(tree / "10_logo", tmp_path / "masks" / "10_logo")  # the sub-folder kept
    flat = tmp_path / "flat"
    shutil.copytree(masks, flat)  # kohya's flat folder
    for folder in (tmp_path / "masks", flat):
        items = scan_dataset(_cfg(tree, **{"data.mask_dir": str(folder)}).data).items
        assert len(items) == 4 and all(i.mask is not None and i.mask.stem == i.path.stem for i in items)
    first = sorted(flat.glob("*.png"))[0]
    first.unlink()
    report = build_report(_cfg(tree, **{"data.mask_dir": str(flat)}).data)
    assert [(p.kind, p.path.stem) for p in report.problems] == [("no_mask", first.stem)]
    with pytest.raises(DatasetError, match=r"1 invalid file\(s\): .*\(no_mask\)"):
        scan_dataset(_cfg(tree, **{"data.mask_dir": str(flat), "data.on_invalid": "stop"}).data)
    assert len(scan_dataset(_cfg(tree, **{"data.mask_dir": str(flat), "data.on_invalid": "skip"}).data).items) == 3
    inside = tree / "masks"  # a mask folder inside the dataset: its masks are not training images
    shutil.copytree(masks, inside)
    assert len(scan_dataset(_cfg(tree, **{"data.mask_dir": str(inside)}).data).items) == 4
    with pytest.raises(DatasetError, match="data.mask_dir: .* does not exist"):
        scan_dataset(_cfg(tree, **{"data.mask_dir": str(tmp_path / "nope")}).data)


def test_kohya_keys_and_refusals(tmp_path: Path) -> None:
    f = tmp_path / "kohya.toml"
    f.write_text('[training_arguments]\nmasked_loss = true\nconditioning_data_dir = "masks"\n', encoding="utf-8")
    assert load_config(f).data.mask_dir == "masks"
    f.write_text("masked_loss = true\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="masked_loss: True needs masks: alpha_mask: true .* or conditioning_data_dir"):
        load_config(f)
    with pytest.raises(ConfigError, match="data.mask_dir: the loss is masked by the alpha channel .* not both"):
        build_config({"data.alpha_mask": True, "data.mask_dir": "masks"})


def test_a_run_with_a_mask_folder_trains_as_the_same_alpha_masks(data: Path, tmp_path: Path) -> None:
    from lora_trainer.train.trainer import Trainer

    host = TinyHost()
    masks = _masks_from_alpha(data, tmp_path / "masks")
    values = {"train.max_train_steps": 3, "train.batch_size": 2, "output.save_precision": "fp32", "data.flip": True}
    by_alpha = Trainer(tiny_config(data, tmp_path / "a", **values, **{"data.alpha_mask": True}), host=host).run()
    by_folder = Trainer(tiny_config(data, tmp_path / "b", **values, **{"data.mask_dir": str(masks)}), host=host).run()
    plain = Trainer(tiny_config(data, tmp_path / "c", **values), host=host).run()
    a, b, c = (lora_tensors(r.lora_path) for r in (by_alpha, by_folder, plain))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.allclose(b[k], c[k]) for k in b)
    assert read_lora_file(by_folder.lora_path)[1]["ss_masked_loss"] == "True"

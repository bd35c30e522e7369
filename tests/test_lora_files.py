"""LoRA files: names, versions, atomic writes, metadata, previews and the inspect command."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from lora_fixtures import make_bundle, net_cfg, randomize
from PIL import Image

from lora_trainer.config import build_config
from lora_trainer.errors import LoraFormatError, OutputError
from lora_trainer.lora import files
from lora_trainer.lora.cli import inspect_main
from lora_trainer.lora.inject import inject_lora
from lora_trainer.lora.metadata import build_metadata
from lora_trainer.lora.report import analyse


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "CON", "nul.txt", "com1", "bad\x00name", "tab\tname",
                                  "", "  ", ".", "..", ".hidden", "trailing.", "what?", "x" * 200])
def test_unusable_names_are_refused(name):
    with pytest.raises(OutputError, match="output.output_name"):
        files.sanitize_name(name)


@pytest.mark.parametrize("name,want", [("my_lora", "my_lora"), ("  Style v1.5 ", "Style v1.5"),
                                       ("café-ü", "café-ü"), ("x.safetensors", "x"), ("CONSOLE", "CONSOLE")])
def test_good_names_pass(name, want):
    assert files.sanitize_name(name) == want


def test_existing_files_get_versioned_names(tmp_path):
    assert files.resolve_output_path(tmp_path, "a") == tmp_path / "a.safetensors"
    (tmp_path / "a.safetensors").write_bytes(b"x")
    assert files.resolve_output_path(tmp_path, "a").name == "a_v2.safetensors"
    (tmp_path / "a_v2.safetensors").write_bytes(b"x")
    assert files.resolve_output_path(tmp_path, "a").name == "a_v3.safetensors"
    assert files.resolve_output_path(tmp_path, "a_v2").name == "a_v3.safetensors"
    assert files.resolve_output_path(tmp_path, "a", overwrite=True).name == "a.safetensors"


def _small_lora(arch="sd1", **kw):
    bundle = make_bundle(arch)
    net = inject_lora(bundle, net_cfg(**kw))
    randomize(net)
    return bundle, net


@pytest.fixture(scope="module")
def sd1_lora():
    return _small_lora("sd1")


def test_save_is_atomic_and_reads_back(tmp_path, sd1_lora, monkeypatch):
    _, net = sd1_lora
    tensors = net.to_kohya()
    path = files.save_lora_file(tmp_path / "a.safetensors", tensors, {"ss_network_dim": "4"})
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]  # no temporary file left
    back, md = files.read_lora_file(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in back)
    assert md["ss_network_dim"] == "4" and len(md["sshs_model_hash"]) == 64
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):  # a disk-full halfway through the write
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "save_file", crash)
    with pytest.raises(OutputError, match="not written: the disk is full"):
        files.save_lora_file(path, tensors, {})
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a.safetensors"]
    with pytest.raises(LoraFormatError, match="ss_x"):
        files.save_lora_file(path, tensors, {"ss_x": 3})


def test_reading_bad_files_names_them(tmp_path):
    with pytest.raises(LoraFormatError, match="missing.safetensors"):
        files.read_lora_file(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(LoraFormatError, match="junk.safetensors"):
        files.read_lora_file(junk)


def test_preview_png_beside_the_lora(tmp_path):
    target = files.save_preview_png(tmp_path / "a.safetensors", Image.new("RGB", (8, 8), "red"))
    assert target == tmp_path / "a.png" and Image.open(target).size == (8, 8)
    assert sorted(os.listdir(tmp_path)) == ["a.png"]


@pytest.mark.parametrize("arch,pred,version,spec", [
    ("sd1", "epsilon", "sd_v1", "stable-diffusion-v1/lora"),
    ("sd2", "v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v/lora"),
    ("sdxl", "epsilon", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
])
def test_metadata_fields(arch, pred, version, spec):
    cfg = build_config({"network.rank": 4, "network.alpha": 1.5, "data.trigger_word": "sks dog",
                        "optim.learning_rate": 2e-4, "train.seed": 7, "output.training_comment": "30 photos",
                        "optim.optimizer_args": "weight_decay=0.1 amsgrad=True"})
    bundle = dataclasses.replace(make_bundle("sd1"), arch=arch, prediction_type=pred, model_hash="ab" * 32,
                                 legacy_hash="12345678", name="base.safetensors")
    md = build_metadata(cfg, bundle, num_images=8, tag_frequency={"img": {"dog": 8}},
                        dataset_dirs={"img": {"n_repeats": 1, "img_count": 8}}, steps=100, epoch=2,
                        started_at=1_700_000_000.0, finished_at=1_700_000_100.0, rank=4, alpha=1.5,
                        output_name="dog")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    assert md["ss_base_model_version"] == version and md["modelspec.architecture"] == spec
    assert md["ss_v2"] == str(arch == "sd2") and md["ss_network_module"] == "networks.lora"
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("4", "1.5")
    assert md["ss_new_sd_model_hash"] == "ab" * 32 and md["ss_sd_model_hash"] == "12345678"
    assert json.loads(md["ss_tag_frequency"]) == {"img": {"dog": 8}}
    assert json.loads(md["lora_trainer_config"])["network"]["rank"] == 4
    assert md["modelspec.trigger_phrase"] == "sks dog" and md["modelspec.prediction_type"] == (
        "v" if pred == "v_prediction" else "epsilon")
    assert md["modelspec.date"] == "2023-11-14T22:15:00" and md["ss_steps"] == "100" and md["ss_seed"] == "7"
    assert md["ss_training_comment"] == "30 photos" and md["ss_optimizer"] == "adamw(weight_decay=0.1,amsgrad=True)"
    plain = build_metadata(
        build_config({}), bundle, num_images=1, tag_frequency=None, dataset_dirs=None, steps=1, epoch=1,
        started_at=None, finished_at=None, rank=4, alpha=1.0, output_name="x")
    assert "ss_training_comment" not in plain and "ss_caption_dropout_every_n_epochs" not in plain
    every = build_metadata(
        build_config({"data.caption_dropout_every_n_epochs": 3}), bundle, num_images=1, tag_frequency=None,
        dataset_dirs=None, steps=1, epoch=1, started_at=None, finished_at=None, rank=4, alpha=1.0, output_name="x")
    assert every["ss_caption_dropout_every_n_epochs"] == "3"  # kohya's key, written when set
    for key in ("ss_output_name", "ss_sd_model_name", "ss_resolution", "ss_num_train_images", "ss_dataset_dirs",
                "ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_epoch", "ss_optimizer",
                "ss_training_started_at", "ss_training_finished_at", "modelspec.sai_model_spec",
                "modelspec.implementation", "modelspec.title", "modelspec.resolution"):
        assert key in md


def test_inspect_our_file_is_ok_for_every_loader(tmp_path, sd1_lora, capsys):
    _, net = sd1_lora
    path = files.save_lora_file(tmp_path / "a.safetensors", net.to_kohya(),
                                {"ss_base_model_version": "sd_v1", "ss_network_dim": "4"})
    assert inspect_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "architecture: sd1" in out and "unet down" in out and "rank 4" in out and "alpha 1.5" in out
    assert out.count(" OK") == 4
    assert inspect_main([str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["key_count"] == 3 * report["module_count"] and report["groups"]["te"]["ranks"] == [4]
    assert report["targets"]["attn1_to_q"] == 16 and report["a1111_version_label"] == "SD1"


def test_inspect_flags_broken_files(sd1_lora):
    _, net = sd1_lora
    good = net.to_kohya()
    no_alpha = {k: v for k, v in good.items() if not k.endswith(".alpha")}
    r = analyse(no_alpha, {})
    assert any("no alpha" in p for p in r["problems"]) and not any(v["ok"] for v in r["verdicts"].values())
    assert r["a1111_version_label"] == "Unknown"
    mixed = {**good, **{k.replace("lora_te_", "lora_te1_"): v for k, v in good.items() if k.startswith("lora_te_")}}
    r = analyse(mixed, {"ss_base_model_version": "sd_v1"})
    assert any("mixed text-encoder prefixes" in p for p in r["problems"])
    assert not r["verdicts"]["A1111 built-in Lora"]["ok"]
    odd = {**good, "diffusion_model.x.lora_down.weight": torch.zeros(1, 1)}
    r = analyse(odd, {"ss_base_model_version": "sd_v1"})
    assert not r["verdicts"]["diffusers"]["ok"]
    assert any("lora_unet_" in issue for issue in r["verdicts"]["diffusers"]["issues"])
    r = analyse(good, {"ss_base_model_version": "sdxl_base_v1-0"})
    assert any("metadata says sdxl" in p for p in r["problems"])

"""The memory estimate of a run as configured: its network, caption length, caches and optimizer,
printed by ``train --check`` and ``bench --estimate --config``, and checked on a GPU before the
caches fill."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lora_trainer.bench import adapters, estimate
from lora_trainer.config import NetworkConfig, build_config
from lora_trainer.train import memory_check
from lora_trainer.train.events import TrainEvent
from lora_trainer.train.trainer import Trainer
from tests.train_helpers import TinyHost, make_data, tiny_config

SD1_BLOCKS = 25  # kohya's block_dims for SD1: the first unused, 12 down, mid, 11 up


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("memory_data"))


def _tiny(network: str = "lora", **fields: Any) -> estimate.MemoryEstimate:
    """The estimate of the tiny SD1 UNet at 256 px with the network settings ``fields``."""
    args = adapters.network_args(NetworkConfig(type=network, **fields))
    return estimate.estimate_peak_memory("sd1", 256, 1, 16, "bf16", False, size="tiny", network=network,
                                         network_args=args)


def test_the_estimate_traces_the_network_the_trainer_builds() -> None:
    base = _tiny()
    # The trainer's own placement at the default settings is the estimate's default one.
    same = _tiny(block_dims=",".join(["16"] * SD1_BLOCKS))
    assert (same.lora_gb, same.step_gb) == (base.lora_gb, base.step_gb)
    # Every block at rank 4: a quarter of the parameters; the up blocks left out: fewer layers.
    quarter = _tiny(block_dims=",".join(["4"] * SD1_BLOCKS))
    assert quarter.lora_gb == pytest.approx(base.lora_gb / 4) and quarter.step_gb < base.step_gb
    no_up = _tiny(block_dims=",".join(["16"] * 13 + ["0"] * 12))
    assert no_up.lora_gb < base.lora_gb * 0.6 and no_up.step_gb < base.step_gb
    # The 3x3 convolutions adapted (conv_rank): more parameters and more kept for the backward.
    conv = _tiny(conv_rank=8)
    assert conv.lora_gb > base.lora_gb * 1.5 and conv.step_gb > base.step_gb
    # LoRA dropout keeps each adapted layer's dropped input for the backward pass.
    assert _tiny(dropout=0.1).step_gb > base.step_gb * 1.2
    # LoKr's factor sets the size of its small factor: 4 gives more parameters than the squarest.
    assert _tiny("lokr", lokr_factor=4).lora_gb > 2 * _tiny("lokr").lora_gb
    # LyCORIS' full preset adds the ResNet blocks, samplers, conv in/out and time embedding.
    full = _tiny(lycoris_preset="full")
    assert full.lora_gb > conv.lora_gb and full.step_gb > base.step_gb
    assert _tiny(lycoris_preset="attn-only").lora_gb < base.lora_gb
    # A trained text encoder's adapters (and their optimizer state) come on top.
    te = estimate.estimate_peak_memory("sd1", 256, 1, 16, "bf16", False, size="tiny", train_text_encoder=True,
                                       network_args=adapters.network_args(NetworkConfig(train_text_encoder=True)))
    assert te.lora_gb > base.lora_gb and te.step_gb > base.step_gb  # and it runs in the step
    # Prodigy keeps four states per parameter, AdamW two.
    prodigy = estimate.estimate_peak_memory("sd1", 256, 1, 16, "bf16", False, size="tiny", optimizer="prodigy")
    assert prodigy.lora_gb == pytest.approx(base.lora_gb * 20 / 12)


def test_a_run_continued_from_a_file_is_estimated_at_the_files_ranks(tmp_path: Path) -> None:
    from lora_fixtures import make_bundle, net_cfg

    from lora_trainer.lora.files import save_lora_file
    from lora_trainer.lora.inject import inject_lora

    net = inject_lora(make_bundle("sd1"), net_cfg(rank=64, train_text_encoder=False))
    path = save_lora_file(tmp_path / "rank64.safetensors", net.to_kohya(), {})
    net.remove()
    base = _tiny()  # network.rank 16
    continued = _tiny(init_from=str(path))
    assert continued.lora_gb == pytest.approx(base.lora_gb * 4) and continued.step_gb > base.step_gb


def test_network_args_are_the_shaping_settings_that_differ_from_the_defaults() -> None:
    assert adapters.network_args(NetworkConfig()) == ()
    assert adapters.network_args(NetworkConfig(alpha=4.0, block_alphas="1")) == ()  # alphas allocate nothing
    assert adapters.network_args(NetworkConfig(conv_rank=8, target_modules=["to_q"])) == (
        ("conv_rank", 8), ("target_modules", ("to_q",)))
    # LoKr's options count for LoKr only, as the trainer reads them
    assert adapters.network_args(NetworkConfig(lokr_factor=4)) == ()
    assert adapters.network_args(NetworkConfig(type="lokr", lokr_factor=4)) == (("lokr_factor", 4),)


@pytest.mark.parametrize(("network", "args", "chunks"), [
    ("locon", (("conv_rank", 8), ("dropout", 0.1)), 1),
    ("lora", (("block_dims", ",".join(["4"] * 12 + ["32"] * 13)), ("train_text_encoder", True)), 3),
])
def test_estimate_with_a_runs_network_settings_matches_a_measured_step(network: str, args: tuple,
                                                                          chunks: int) -> None:
    # A real fp32 step of the tiny UNet with those adapters (placed by the trainer's injection;
    # a trained text encoder runs in the step) and captions of ``chunks`` x 77 tokens on the CPU,
    # in a fresh process, vs the prediction.
    from lora_trainer.bench.memcheck import measure_step_memory

    m = measure_step_memory("sd1", 512, 1, 16, False, size="tiny", threads=1, network=network,
                            network_args=args, token_chunks=chunks)
    assert m.measured_gb > 0.045, m
    assert -0.05 <= m.error < 0.15, m


def test_a_runs_estimate_reads_its_settings() -> None:
    base = build_config({"data.resolution": 512})
    plain = memory_check.run_estimate(base, "sd1")
    assert (plain.resolution, plain.batch_size, plain.precision, plain.network) == (512, 1, "bf16", "lora")
    # Shuffled captions are encoded every step: the text encoder stays on the card.
    shuffled = memory_check.run_estimate(build_config({"data.shuffle_captions": True}, base=base), "sd1")
    assert shuffled.weights_gb > plain.weights_gb + 0.2 and shuffled.text_caching_gb == 0
    # ... unless the dataset knows its captions never change (a WebUI's run asks it)
    assert memory_check.run_estimate(build_config({"data.shuffle_captions": True}, base=base), "sd1",
                                     captions_fixed=True).weights_gb == plain.weights_gb
    # Captions of up to 225 tokens: three chunks of context in every cross-attention.
    long = memory_check.run_estimate(build_config({"data.max_token_length": 225}, base=base), "sd1")
    assert long.step_gb > plain.step_gb
    # Random crops: the VAE encodes every step's images, so it stays.
    crops = memory_check.run_estimate(build_config({"data.crop": "random"}, base=base), "sd1")
    assert not crops.cache_latents and crops.weights_gb > plain.weights_gb
    # An fp32 run, frozen weights kept in fp32
    full = memory_check.run_estimate(build_config({"train.mixed_precision": "no"}, base=base), "sd1")
    assert full.precision == "fp32" and full.weights_gb == pytest.approx(2 * plain.weights_gb)


def test_the_warning_names_the_need_what_is_there_and_what_to_change() -> None:
    cfg = build_config({"data.resolution": 1024, "train.batch_size": 2, "network.train_text_encoder": True})
    est = memory_check.run_estimate(cfg, "sdxl")
    need = estimate.needed_gb(est)
    assert need > est.total_gb  # room for fragmentation on top of the peak
    assert memory_check.memory_warning(cfg, est, need + 0.1, "cuda:0") is None
    text = memory_check.memory_warning(cfg, est, 8.0, "cuda:0")
    assert text is not None and "\n" not in text
    assert f"need {estimate.round_up(need, 1):.1f} GiB of cuda:0" in text and "8.0 GiB is there" in text
    for fix in ("turn on train.gradient_checkpointing", "lower train.batch_size (now 2)",
                "turn off network.train_text_encoder", "lower data.resolution (now 1024)", "'auto' preset"):
        assert fix in text


def test_a_run_short_of_memory_says_so_before_its_caches_fill(data: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The run's device reports 0.25 GiB for it (a CUDA card is asked; the CPU has no such figure).
    monkeypatch.setattr(memory_check, "available_gb", lambda device, modules: 0.25)
    events: list[TrainEvent] = []
    trainer = Trainer(tiny_config(data, tmp_path / "out"), host=TinyHost("sd1"), callbacks=[events.append])
    trainer.run()
    said = [e.message for e in events if e.kind == "status"]
    warning = next(i for i, m in enumerate(said) if m.startswith("memory: this run is estimated to need"))
    assert "0.2 GiB is there for it" in said[warning] and "turn on train.gradient_checkpointing" in said[warning]
    assert warning < next(i for i, m in enumerate(said) if m.startswith("caching latents"))
    assert trainer.memory_estimate is not None and trainer.memory_estimate.arch == "sd1"


def test_a_run_with_room_or_without_a_card_says_nothing_of_memory(data: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[TrainEvent] = []
    trainer = Trainer(tiny_config(data, tmp_path / "cpu"), host=TinyHost("sd1"), callbacks=[events.append])
    trainer.run()
    assert trainer.memory_estimate is None  # on the CPU nothing is estimated
    monkeypatch.setattr(memory_check, "available_gb", lambda device, modules: 1000.0)
    trainer = Trainer(tiny_config(data, tmp_path / "big"), host=TinyHost("sd1"), callbacks=[events.append])
    trainer.run()
    assert trainer.memory_estimate is not None
    assert not any((e.message or "").startswith("memory:") for e in events)


def test_an_estimate_that_fails_never_stops_the_run(data: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("no trace")

    monkeypatch.setattr(memory_check, "available_gb", lambda device, modules: 0.25)
    monkeypatch.setattr(memory_check, "run_estimate", broken)
    result = Trainer(tiny_config(data, tmp_path / "out"), host=TinyHost("sd1")).run()
    assert result.steps == 2 and result.lora_path is not None


def test_out_of_memory_names_what_the_settings_were_estimated_to_need(data: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_trainer.errors import DeviceMemoryError

    monkeypatch.setattr(memory_check, "available_gb", lambda device, modules: 1000.0)
    host = TinyHost("sd1")

    def out_of_memory(module: torch.nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    hook = host.bundle.unet.register_forward_pre_hook(out_of_memory)
    trainer = Trainer(tiny_config(data, tmp_path / "out"), host=host)
    try:
        with pytest.raises(DeviceMemoryError) as caught:
            trainer.run()
    finally:
        hook.remove()
    need = estimate.needed_gb(trainer.memory_estimate)
    assert f"(2.00 GiB more asked, these settings are estimated to need {need:.1f} GiB)" in str(caught.value)


def _header_only(path: Path, tensors: dict[str, tuple[int, ...]]) -> Path:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path))
    return path


def test_the_model_is_told_from_the_config_or_the_files_header(tmp_path: Path) -> None:
    from lora_trainer.families.sd_detect import SD1_TE_KEY, UNET_IN_KEY

    def model(**values: Any) -> Any:
        return memory_check.model_of(build_config(values))

    assert model(**{"model.base_model": "demo"}) is None  # the tiny embedded model
    assert model(**{"model.base_model": str(tmp_path / "missing.safetensors")}) is None
    assert model(**{"model.base_model": str(tmp_path / "missing"), "model.arch": "sdxl"}) == ("sdxl", "")
    sd1 = _header_only(tmp_path / "sd1.safetensors", {UNET_IN_KEY: (2, 4, 1, 1), SD1_TE_KEY: (2, 2)})
    assert model(**{"model.base_model": str(sd1)}) == ("sd1", "")
    schnell = _header_only(tmp_path / "flux.safetensors", {"double_blocks.0.img_attn.qkv.weight": (3, 1)})
    assert model(**{"model.base_model": str(schnell)}) == ("flux1", "schnell")
    # a variant not known counts as the family's largest, never less
    assert model(**{"model.base_model": str(tmp_path / "missing"), "model.arch": "sd3"}) == ("sd3", "large")


def test_train_check_prints_what_the_run_needs(data: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from lora_trainer.families.sd_detect import SD1_TE_KEY, UNET_IN_KEY
    from lora_trainer.train.cli import main

    sd1 = _header_only(tmp_path / "sd1.safetensors", {UNET_IN_KEY: (2, 4, 1, 1), SD1_TE_KEY: (2, 2)})
    args = ["--check", "--set", f"model.base_model={sd1}", "--set", f"data.train_data_dir={data}",
            "--set", "data.resolution=512", "--set", f"output.output_dir={tmp_path / 'out'}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    est = memory_check.run_estimate(build_config({"data.resolution": 512}), "sd1")
    assert f"memory: estimated peak {estimate.round_up(est.total_gb, 1):.1f} GiB on a GPU for full-size sd1" in out


def test_bench_estimates_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from lora_trainer.bench.cli import main
    from lora_trainer.errors import ConfigError

    config = tmp_path / "my.yaml"
    config.write_text("model:\n  arch: sd1\n  base_model: /models/mine.safetensors\ndata:\n  resolution: 512\n"
                      "train:\n  batch_size: 2\nnetwork:\n  conv_rank: 8\noptim:\n  optimizer: lion\n",
                      encoding="utf-8")
    assert main(["--estimate", "--config", str(config), "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "e.json").read_text(encoding="utf-8"))["estimate"]
    cfg = build_config({"data.resolution": 512, "train.batch_size": 2, "network.conv_rank": 8,
                        "optim.optimizer": "lion"})
    assert saved["total_gb"] == pytest.approx(memory_check.run_estimate(cfg, "sd1").total_gb)
    assert saved["batch_size"] == 2 and "LoRA + optimizer" in out and "full-size sd1" in out
    config.write_text("model:\n  base_model: /models/mine.safetensors\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not known before it loads .*; name it with --arch"):
        main(["--estimate", "--config", str(config)])
    with pytest.raises(ConfigError, match="--config: goes with --estimate"):
        main(["--config", str(config)])


def test_auto_sizes_the_forms_settings_it_leaves_alone() -> None:
    # Settings no preset sets (conv ranks, long and shuffled captions) make every step larger;
    # those a preset sets (text encoder frozen, AdamW) are the preset's.
    from lora_trainer.ui import presets

    form = build_config({"network.conv_rank": 16, "data.max_token_length": 225, "data.shuffle_captions": True,
                         "network.train_text_encoder": True, "optim.optimizer": "prodigy"})
    plain, sized = presets.auto_values("sd1", 5.0), presets.auto_values("sd1", 5.0, form=form)
    run = build_config(sized, base=form)  # the preset's values in the form, as the tab puts them
    assert not run.network.train_text_encoder and run.optim.optimizer == "adamw"
    budget = 5.0 - 1.5  # the reserve auto leaves the host
    assert estimate.needed_gb(memory_check.run_estimate(run, "sd1")) <= budget
    # what auto picks for the preset's own fields alone would not fit with the form's others
    assert estimate.needed_gb(memory_check.run_estimate(build_config(plain, base=form), "sd1")) > budget
    note = presets.auto_summary("sd1", 5.0, form=form)
    shown = float(note[note.rindex("estimated peak ") + len("estimated peak "):-len(" GiB)")])
    assert memory_check.run_estimate(run, "sd1").total_gb <= shown  # the note speaks of the form's run


def test_the_tabs_auto_preset_reads_the_whole_form() -> None:
    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.ui.tab import build_tab
    from lora_trainer.ui.train_section import preset_for_host

    blocks = build_tab(StandaloneHost())
    fns = list(blocks.fns.values()) if isinstance(blocks.fns, dict) else list(blocks.fns)
    [applier] = [i for i, f in enumerate(fns) if getattr(f.fn, "__name__", "") == "apply_preset"]
    fields = [c for c in blocks.blocks.values() if (getattr(c, "elem_id", None) or "").startswith("lt-f-")]
    assert len(fields) > 50 and len(blocks.config["dependencies"][applier]["inputs"]) >= 5 + len(fields)
    form = build_config({"network.conv_rank": 16, "data.max_token_length": 225, "data.shuffle_captions": True})
    host = StandaloneHost()
    assert preset_for_host(host, "auto", "sd1", "lora", 5.0, form=form) != preset_for_host(
        host, "auto", "sd1", "lora", 5.0)

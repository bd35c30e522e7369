"""SDXL and SD2-v, mixed precision, gradient checkpointing, accumulation, Ctrl-C: the paths a
quick SD1 run does not take."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_trainer.errors import ConfigError
from lora_trainer.torch_compat import autocast_supported
from lora_trainer.train import checkpointing
from lora_trainer.train.events import TrainEvent
from lora_trainer.train.trainer import Trainer
from tests.train_helpers import TinyHost, lora_tensors, make_data, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"), n=2)


@pytest.fixture(scope="module")
def host() -> TinyHost:
    return TinyHost("sd1")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_with_fp32_lora_weights(tmp_path: Path, data: Path, host: TinyHost, precision: str) -> None:
    dtypes: list[torch.dtype] = []
    checkpointed: list[int] = []

    class Spy:
        """Records the dtype of the LoRA parameters the optimizer updates."""

        def __call__(self, ev: TrainEvent) -> None:
            if ev.kind == "step":
                dtypes.extend(p.dtype for n, p in host.bundle.unet.named_parameters() if "lora_" in n)
                checkpointed.append(checkpointing.count(host.bundle.unet))

    cfg = tiny_config(data, tmp_path / "out", **{"train.mixed_precision": precision,
                                                 "train.gradient_checkpointing": True,
                                                 "train.gradient_accumulation_steps": 2,
                                                 "output.save_precision": "bf16"})
    if not autocast_supported("cpu", {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]):
        # torch 2.1 (the A1111 WebUI's) autocasts only to bf16 on the CPU: said before training
        with pytest.raises(ConfigError, match=f"train.mixed_precision: {precision} does not run on cpu"):
            Trainer(cfg, host=host, callbacks=[Spy()]).run()
        assert not dtypes
        return
    result = Trainer(cfg, host=host, callbacks=[Spy()]).run()
    assert result.steps == 2 and result.final_loss is not None and result.final_loss == result.final_loss
    assert dtypes and set(dtypes) == {torch.float32}
    saved = lora_tensors(result.lora_path)
    assert {v.dtype for k, v in saved.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    # checkpointing was on in every step and is switched off again afterwards
    assert len(checkpointed) == 2 and set(checkpointed) == {len(checkpointing.units(host.bundle.unet))} != {0}
    assert checkpointing.count(host.bundle.unet) == 0
    assert not host.bundle.unet.training


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(tmp_path: Path, data: Path, host: TinyHost) -> None:
    import os
    import signal

    def press_ctrl_c(ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    result = Trainer(tiny_config(data, tmp_path / "out", **{"train.max_train_steps": 20}), host=host,
                     callbacks=[press_ctrl_c]).run()
    assert result.stopped and result.steps == 1 and result.lora_path.is_file()
    assert (tmp_path / "out" / "checkpoints" / "tiny" / "step-000001" / "training_state.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is before  # the CLI's own handling is back


@pytest.mark.parametrize("arch,prediction_type", [("sdxl", "epsilon"), ("sd2", "v_prediction")])
def test_other_architectures_train(tmp_path: Path, data: Path, arch: str, prediction_type: str) -> None:
    host = TinyHost(arch, prediction_type)
    cfg = tiny_config(data, tmp_path / "out", **{"train.min_snr_gamma": 5.0, "train.noise_offset": 0.05,
                                                 "network.train_text_encoder": True, "sample.prompt": "a red circle",
                                                 "sample.steps": 2})
    result = Trainer(cfg, host=host).run()
    assert result.steps == 2 and result.final_loss is not None and result.final_loss == result.final_loss
    keys = list(lora_tensors(result.lora_path))
    prefixes = {k.split("_")[1] for k in keys}
    assert prefixes == ({"unet", "te1", "te2"} if arch == "sdxl" else {"unet", "te"})
    preview = result.lora_path.with_suffix(".png")
    assert preview.is_file() and (tmp_path / "out" / "samples" / "tiny" / "step-000002.png").is_file()


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_text_encoder_lora_learns_with_gradient_checkpointing(tmp_path: Path, data: Path, arch: str) -> None:
    """Checkpointed CLIP layers still pass gradients to their LoRA (on transformers < 4.35, as in
    the A1111 WebUI, checkpointing is re-entrant: only inputs that require grad get any)."""
    moved = {}
    for on in (False, True):
        cfg = tiny_config(data, tmp_path / f"out-{on}", **{
            "network.train_text_encoder": True, "train.gradient_checkpointing": on})
        tensors = lora_tensors(Trainer(cfg, host=TinyHost(arch)).run().lora_path)
        # lora_up starts at zero: the ones that moved got gradients (SDXL's first text encoder
        # gives its penultimate layer, so its last layer gets none either way)
        moved[on] = {k for k, v in tensors.items() if k.startswith("lora_te") and "lora_up" in k
                                and v.abs().sum() > 0}
    assert moved[True] and moved[True] == moved[False]


def test_auto_precision_is_the_hosts_compute_dtype_else_the_devices(tmp_path: Path, data: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """train.mixed_precision "auto" (the default) trains in the precision a WebUI's model computes
    in, else bf16 on a CUDA GPU that has it, fp16 on other CUDA GPUs and fp32 elsewhere; the run's
    saved config and its LoRA's metadata name the precision it trained in. A host's model is asked
    once the run has acquired it (a WebUI may load or switch it until then)."""
    import yaml
    from safetensors import safe_open

    from lora_trainer.config import TrainConfig
    from lora_trainer.hosts.base import LoadedModel
    from lora_trainer.models.loaders import resolve_mixed_precision as resolve

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert (resolve("auto", cuda), resolve("auto", cpu), resolve("auto", torch.device("mps"))) == ("bf16", "no", "no")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a T4 or an RTX 20xx
    assert resolve("auto", cuda) == "fp16"
    assert (resolve("auto", cuda, "fp16"), resolve("auto", cuda, "fp32"), resolve("auto", cpu, "bf16")) == (
        "fp16", "no", "bf16")
    assert resolve("fp16", cpu, "bf16") == "fp16" and TrainConfig().train.mixed_precision == "auto"

    class WebUILike(TinyHost):
        """A host with a model of its own (a WebUI's), which it may load only when a run acquires it."""

        def loaded_model(self) -> LoadedModel:
            return LoadedModel("tiny", None)

    from types import SimpleNamespace

    from lora_trainer.train.trainer import with_run_precision

    auto = tiny_config(data, tmp_path / "x")
    for dtype, expected in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "no")):
        bundle = SimpleNamespace(device="cuda", dtype=dtype)  # the dtype the host's UNet computes in
        assert with_run_precision(auto, WebUILike("sd1"), bundle).train.mixed_precision == expected
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    standalone = with_run_precision(auto, TinyHost("sd1"), SimpleNamespace(device="cuda", dtype=torch.float16))
    assert standalone.train.mixed_precision == "bf16"  # the device decides, as it did the weights' dtype

    result = Trainer(tiny_config(data, tmp_path / "out", **{"train.max_train_steps": 1}), host=TinyHost("sd1")).run()
    with safe_open(str(result.lora_path), "pt") as f:  # this CPU: fp32
        assert f.metadata()["ss_mixed_precision"] == "no"
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["train"]["mixed_precision"] == "no"

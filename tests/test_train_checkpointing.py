"""Gradient checkpointing of all or a share of a denoiser's blocks (train/checkpointing.py): the
same units on every host's UNet and on the transformers, exact gradients, LoRA layers in blocks
whose inputs need no gradient still train, the memory it saves as estimated and as measured."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_trainer.bench import estimate
from lora_trainer.errors import ConfigError
from lora_trainer.models import tiny
from lora_trainer.train import checkpointing
from lora_trainer.train.trainer import Trainer
from tests.train_helpers import TinyHost, lora_tensors, make_data, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"), n=2)


def forward_order(model: torch.nn.Module, run) -> list[torch.nn.Module]:
    """The units of ``model`` in the order a forward pass calls them."""
    called: list[torch.nn.Module] = []
    hooks = [u.register_forward_pre_hook(lambda m, *_: called.append(m)) for u in checkpointing.units(model)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return called


def test_units_are_the_residual_and_transformer_blocks_in_forward_order() -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(tiny.unet_config("sd1")).eval()
    units = checkpointing.units(unet)
    assert {type(u).__name__ for u in units} == {"ResnetBlock2D", "BasicTransformerBlock"}
    n_res = sum(1 for m in unet.modules() if type(m).__name__ == "ResnetBlock2D")
    assert len(units) == n_res + sum(1 for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, unet.config.cross_attention_dim)
    called = forward_order(unet, lambda: unet(x, t, ctx))
    assert len(called) == len(units) and set(called) == set(units)
    for kind in ("ResnetBlock2D", "BasicTransformerBlock"):  # within a kind, the pass's order
        assert [u for u in called if type(u).__name__ == kind] == [u for u in units if type(u).__name__ == kind]


def test_units_of_the_webuis_ldm_unet_are_its_resblocks_and_transformer_blocks_in_forward_order() -> None:
    from tests.lora_fixtures import ldm_unet  # the WebUI's LDM classes (tests/run.sh installs them)

    unet = ldm_unet("sd1")
    units = checkpointing.units(unet)
    assert {type(u).__name__ for u in units} == {"ResBlock", "BasicTransformerBlock"}
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    assert forward_order(unet, lambda: unet(x, t, ctx)) == units


@pytest.mark.parametrize("maker", ["tiny_flux", "tiny_sd3"])
def test_units_of_flux_and_sd3_are_their_transformer_blocks(maker: str) -> None:
    from tests import dit_fixtures

    model = getattr(dit_fixtures, maker)()
    units = checkpointing.units(model)
    blocks = [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]
    assert units == blocks and units


def test_a_share_takes_transformer_blocks_first_each_kind_spread_along_the_pass() -> None:
    from diffusers import UNet2DConditionModel

    units = checkpointing.units(UNet2DConditionModel.from_config(tiny.unet_config("sd1")))
    kinds = [type(u).__name__ for u in units]
    assert checkpointing.chosen(units, 0) == [] and set(checkpointing.chosen(units, 1)) == set(units)
    n_tf = kinds.count("BasicTransformerBlock")
    few = checkpointing.chosen(units, (n_tf - 1) / len(units))
    assert len(few) == n_tf - 1 and {type(u).__name__ for u in few} == {"BasicTransformerBlock"}
    transformer = [u for u in units if type(u).__name__ == "BasicTransformerBlock"]
    assert few[0] is transformer[0] or few[-1] is transformer[-1]  # spread: both ends of the pass take part
    more = checkpointing.chosen(units, (n_tf + 2) / len(units))
    assert sum(type(u).__name__ == "ResnetBlock2D" for u in more) == 2 and set(transformer) <= set(more)
    for share in (0.25, 0.5, 0.75):
        assert len(checkpointing.chosen(units, share)) == round(share * len(units))


def test_checkpointing_is_exact_and_undone(data: Path, tmp_path: Path) -> None:
    """Recomputing gives the same values: a run with every block, with half and with none
    checkpointed writes the same LoRA bit for bit, and the UNet is as it was afterwards."""
    files, seen = {}, {}
    for share in (None, 0.5, 1.0):
        host = TinyHost("sd1")
        counts: list[int] = []
        values = {"output.save_precision": "fp32", "network.conv_rank": 4, "network.conv_alpha": 2.0}  # LoCon too
        if share is not None:
            values.update({"train.gradient_checkpointing": True, "train.checkpointing_share": share})
        cfg = tiny_config(data, tmp_path / str(share), **values)
        result = Trainer(cfg, host=host, callbacks=[
            lambda ev, c=counts, u=host.bundle.unet: c.append(checkpointing.count(u)) if ev.kind == "step" else None,
        ]).run()
        files[share], seen[share] = lora_tensors(result.lora_path), counts
        assert checkpointing.count(host.bundle.unet) == 0
        assert not any("forward" in vars(u) for u in checkpointing.units(host.bundle.unet))
    n = len(checkpointing.units(TinyHost("sd1").bundle.unet))
    assert seen == {None: [0, 0], 0.5: [round(n / 2)] * 2, 1.0: [n] * 2}
    for share in (0.5, 1.0):
        assert files[share].keys() == files[None].keys()
        assert all(torch.equal(files[share][k], files[None][k]) for k in files[None]), share


def test_lora_in_a_block_whose_inputs_need_no_gradient_still_trains(data: Path, tmp_path: Path) -> None:
    """The first residual block's inputs (conv_in's output, the time embedding) need no gradient:
    a re-entrant checkpoint would give its LoCon layers none. Every lora_up moves off zero here."""
    cfg = tiny_config(data, tmp_path / "out", **{"network.conv_rank": 4, "network.conv_alpha": 2.0,
                                                 "train.gradient_checkpointing": True})
    tensors = lora_tensors(Trainer(cfg, host=TinyHost("sd1")).run().lora_path)
    first = [k for k in tensors if k.startswith("lora_unet_down_blocks_0_resnets_0_") and "lora_up" in k]
    assert first and all(tensors[k].abs().sum() > 0 for k in first)
    ups = [k for k in tensors if "lora_up" in k]
    assert all(tensors[k].abs().sum() > 0 for k in ups)


def test_a_share_outside_zero_to_one_is_refused_before_training(data: Path, tmp_path: Path) -> None:
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="train.checkpointing_share"):
            tiny_config(data, tmp_path, **{"train.checkpointing_share": bad})


def test_the_estimate_saves_memory_with_the_share_and_a_cpu_step_agrees() -> None:
    steps = [estimate.trace_step("sd1", 512, 1, 16, "fp32", share, size="tiny", device="cpu")["step"]
             for share in checkpointing.SHARES]
    assert steps == sorted(steps, reverse=True) and len(set(steps)) == len(steps)
    from lora_trainer.bench.memcheck import measure_step_memory

    m = measure_step_memory("sd1", 512, 1, 16, 0.5, size="tiny", threads=1)
    assert -0.05 <= m.error <= 0.15, m


def test_the_run_says_how_many_blocks_it_checkpoints(data: Path, tmp_path: Path) -> None:
    said: list[str] = []
    cfg = tiny_config(data, tmp_path / "out", **{"train.gradient_checkpointing": True,
                                                 "train.checkpointing_share": 0.25, "train.max_train_steps": 1})
    host = TinyHost("sd1")
    Trainer(cfg, host=host, callbacks=[lambda ev: said.append(ev.message) if ev.kind == "status" else None]).run()
    n = len(checkpointing.units(host.bundle.unet))
    assert f"gradient checkpointing: {round(n / 4)} of the {n} blocks recompute their activations" in said



@pytest.mark.parametrize("family,variant", [("flux1", "schnell"), ("sd3", "medium")])
def test_flux_and_sd35_train_exactly_with_a_share_of_their_blocks_checkpointed(
        data: Path, tmp_path: Path, family: str, variant: str) -> None:
    from lora_trainer.families.flow_tiny import build_bundle

    files, counts = {}, {}
    for share in (None, 0.5):
        bundle = build_bundle(family, variant, tmp_path / "tok")
        seen: list[int] = []
        values = {"output.save_precision": "fp32"}
        if share is not None:
            values.update({"train.gradient_checkpointing": True, "train.checkpointing_share": share})
        result = Trainer(tiny_config(data, tmp_path / f"out-{share}", **values), host=TinyHost(bundle=bundle),
                         callbacks=[lambda ev, s=seen, m=bundle.unet: s.append(checkpointing.count(m))
                                    if ev.kind == "step" else None]).run()
        files[share], counts[share] = lora_tensors(result.lora_path), seen
        n = len(checkpointing.units(bundle.unet))
        assert checkpointing.count(bundle.unet) == 0
    assert n and counts == {None: [0, 0], 0.5: [round(n / 2)] * 2}
    assert files[0.5].keys() == files[None].keys()
    assert all(torch.equal(files[0.5][k], files[None][k]) for k in files[None])

"""The memory estimate of Flux.1 and SD3.5: full-size transformers traced on meta, checked against
a real step of the tiny models on the CPU, and the settings "auto" picks from it."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import pytest

from lora_trainer.bench import estimate
from lora_trainer.cli import main as cli_main
from lora_trainer.errors import ConfigError
from lora_trainer.families import get_family

GiB = estimate.GiB
FULL = [("flux1", "dev"), ("sd3", "medium"), ("sd3", "large")]


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB


@pytest.mark.parametrize(("arch", "variant"), FULL)
def test_full_size_estimate_runs_on_meta_and_orders_like_memory(arch: str, variant: str) -> None:
    before = _peak_rss_gb()
    est = {(wd, ckpt, b): estimate.estimate_peak_memory(arch, 1024, b, 16, "bf16", ckpt, variant=variant,
                                                        weight_dtype=wd)
           for wd, ckpt, b in [("auto", True, 1), ("fp8", True, 1), ("nf4", True, 1), ("auto", False, 1),
                               ("auto", True, 2)]}
    assert _peak_rss_gb() - before < 2.0  # gigabytes of weights and activations, none of them allocated
    family = get_family(arch)
    bf16, fp8, nf4 = est["auto", True, 1], est["fp8", True, 1], est["nf4", True, 1]
    # the frozen transformer as the family stores it
    for e, wd in ((bf16, "bf16"), (fp8, "fp8"), (nf4, "nf4")):
        assert e.weights_gb == pytest.approx(family.denoiser_weight_bytes(variant, wd) / GiB)
    assert nf4.weights_gb < fp8.weights_gb < bf16.weights_gb
    training = [e.weights_gb + e.lora_gb + e.step_gb for e in (nf4, fp8, bf16)]
    assert training[0] < training[1] < training[2]
    # SD3.5 medium's peak is the load of its text encoders (T5 in fp8 with either storage)
    assert nf4.total_gb <= fp8.total_gb < bf16.total_gb
    assert bf16.step_gb < est["auto", False, 1].step_gb / 3  # checkpointing saves most of the activations
    assert 1.5 * bf16.step_gb < est["auto", True, 2].step_gb < 2.2 * bf16.step_gb
    # T5 is stored in fp8 with the transformer: the text encoders take less while captions are
    # cached, with the transformer parked (it is on the card neither then nor at the load)
    text = family.text_encoder_bytes("auto", 2) / GiB
    assert fp8.text_caching_gb < bf16.text_caching_gb == pytest.approx(text)
    resident = estimate.estimate_peak_memory(arch, 1024, 1, 16, "bf16", True, variant=variant, weight_dtype="fp8",
                                             unet_parked=False)
    assert resident.text_caching_gb - fp8.text_caching_gb == pytest.approx(fp8.weights_gb)
    vae = estimate.trace_latent_caching(arch, 1024, 1, "bf16")["vae_bytes"] / GiB
    for e in est.values():
        assert e.variant == variant and e.lora_gb > 0
        assert e.load_gb == pytest.approx(e.text_caching_gb + vae)  # text encoders and VAE: no transformer
        assert e.total_gb == pytest.approx(max(e.weights_gb + e.lora_gb + e.step_gb, e.caching_gb, e.text_caching_gb,
                                               e.load_gb))


def test_variants_differ_and_the_default_is_the_first() -> None:
    large = estimate.estimate_peak_memory("sd3", 1024, 1, 16, "bf16", True, variant="large")
    medium = estimate.estimate_peak_memory("sd3", 1024, 1, 16, "bf16", True)
    assert medium.variant == "medium" and large.weights_gb > 3 * medium.weights_gb
    # the text encoders' outputs the transformer attends to: Flux-dev 512 T5 tokens, schnell 256
    dev = estimate.estimate_peak_memory("flux1", 1024, 1, 16, "bf16", True)
    schnell = estimate.estimate_peak_memory("flux1", 1024, 1, 16, "bf16", True, variant="schnell")
    assert dev.variant == "dev" and schnell.step_gb < dev.step_gb


def test_bad_variant_or_storage_is_one_line_naming_it() -> None:
    with pytest.raises(ConfigError, match="variant 'xl'.*medium, large"):
        estimate.estimate_peak_memory("sd3", 1024, variant="xl")
    with pytest.raises(ConfigError, match="weight_dtype 'fp8'"):
        estimate.estimate_peak_memory("sd1", 512, weight_dtype="fp8")


# A real fp32 step of the tiny transformer (the full one's blocks, small widths) on the CPU, in a
# fresh process, against the prediction; sizes where the step allocates 45+ MiB. SD3's tiny
# model takes 256 px at most (its position embedding): a larger batch instead.
@pytest.mark.parametrize(("arch", "resolution", "batch", "checkpointing"),
                         [("flux1", 1024, 3, False), ("flux1", 1024, 3, True),
                          ("sd3", 256, 24, False), ("sd3", 256, 24, True)])
def test_estimate_matches_a_measured_transformer_step(arch: str, resolution: int, batch: int,
                                                      checkpointing: bool) -> None:
    from lora_trainer.bench.memcheck import measure_step_memory

    m = measure_step_memory(arch, resolution, batch, 16, checkpointing, size="tiny", threads=1)
    assert m.measured_gb > 0.045, m
    assert -0.05 <= m.error < 0.15, m


def test_estimate_of_the_16_channel_vae_encode_matches_a_measured_one() -> None:
    from lora_trainer.bench.memcheck import measure_step_memory

    m = measure_step_memory("flux1", 768, size="tiny", threads=1, phase="caching")
    assert m.measured_gb > 0.045, m
    assert -0.05 <= m.error < 0.15, m


def test_choose_settings_for_flux_by_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # 24 GB: bf16 weights (22 GiB) leave no room, fp8 with checkpointing fits; 16 GB: nf4;
    # 12 GB: the nf4 step with its headroom does not fit (T5 and the transformer never share it).
    tried: list[tuple[float, str]] = []
    real = estimate.estimate_peak_memory

    def counted(*args: Any, **kw: Any) -> estimate.MemoryEstimate:
        est = real(*args, **kw)
        tried.append((gb, est.weight_dtype))
        return est

    monkeypatch.setattr(estimate, "estimate_peak_memory", counted)
    gb = 0.0
    choices = []
    for gb in (24.0, 16.0, 12.0):
        choices.append(estimate.choose_settings(gb, "flux1"))
    big, mid, small = choices
    # bf16 weights that alone do not fit are estimated once, not once per share checkpointed
    assert tried.count((24.0, "auto")) == 1 and tried.count((16.0, "auto")) == 1
    assert big["fits"] and (big["weight_dtype"], big["gradient_checkpointing"]) == ("fp8", True)
    assert mid["fits"] and (mid["weight_dtype"], mid["gradient_checkpointing"]) == ("nf4", True)
    assert not small["fits"] and small["weight_dtype"] == "nf4"
    for choice, gb in ((big, 24.0), (mid, 16.0)):
        assert choice["estimated_peak_gb"] <= gb - 1.5
    # the storage before the chosen one does not fit even at batch 1 with checkpointing
    bf16 = estimate.estimate_peak_memory("flux1", 1024, 1, 16, "bf16", True)
    fp8 = estimate.estimate_peak_memory("flux1", 1024, 1, 16, "bf16", True, weight_dtype="fp8")
    assert estimate.needed_gb(bf16) > 24.0 - 1.5 and estimate.needed_gb(fp8) > 16.0 - 1.5


def test_sd35_large_fits_12_gb_in_fp8_now_t5_and_the_transformer_never_share_the_card() -> None:
    # With T5-XXL (5.5 GiB in fp8) beside the fp8 transformer while captions were cached, 12 GB
    # did not fit SD3.5 large even in nf4; now the training step sets the peak.
    choice = estimate.choose_settings(12.0, "sd3", variant="large")
    assert choice["fits"] and (choice["weight_dtype"], choice["gradient_checkpointing"]) == ("fp8", True)
    assert choice["estimated_peak_gb"] <= 12.0 - 1.5


def test_auto_preset_sets_the_storage_it_chose() -> None:
    from lora_trainer.ui import presets
    from lora_trainer.ui.train_section import PRESET_FIELDS

    # bf16, the precision of the search above (its cached traces serve this one)
    values = presets.auto_values("flux1", 24.0, compute_dtype="bf16")
    assert values["model.weight_dtype"] == "fp8" and values["train.gradient_checkpointing"]
    assert values["train.mixed_precision"] == "bf16"
    assert "model.weight_dtype" in PRESET_FIELDS  # the tab applies it
    assert presets.auto_values("sd1", 24.0)["model.weight_dtype"] == "auto"


def test_estimate_command_for_flux(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "estimate.json"
    assert cli_main(["bench", "--estimate", "--arch", "flux1", "--checkpointing", "--weight-dtype", "fp8",
                     "--json", str(out)]) == 0
    est = json.loads(out.read_text())["estimate"]
    assert (est["variant"], est["weight_dtype"], est["resolution"]) == ("dev", "fp8", 1024)
    assert est["total_gb"] == pytest.approx(max(est["weights_gb"] + est["lora_gb"] + est["step_gb"],
                                                est["caching_gb"], est["text_caching_gb"], est["load_gb"]))
    printed = capsys.readouterr().out
    assert "text caching" in printed and "load" in printed

"""Benchmark pieces: FLOP count, memory estimator, and a tiny end-to-end bench run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_trainer.bench import estimate
from lora_trainer.bench.flops import count_forward_flops, unet_forward_flops
from lora_trainer.bench.livemem import LiveBytes
from lora_trainer.cli import main as cli_main
from lora_trainer.errors import ConfigError
from lora_trainer.families import get_family


def test_sd15_forward_flops_match_published_figure() -> None:
    # SD1.5 UNet forward at 512x512 is ~0.80 TFLOP per image (an independent published figure).
    flops = unet_forward_flops("sd1", 512, 1, "full")
    assert 0.76e12 < flops < 0.84e12
    assert unet_forward_flops("sd1", 512, 2, "full") == pytest.approx(2 * flops, rel=1e-6)


def test_flop_counter_counts_a_linear_layer() -> None:
    class Lin(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 4, bias=False)

        def forward(self, x, t, c):  # UNet-like call signature
            return self.lin(x)

    assert count_forward_flops(Lin(), torch.ones(3, 8), torch.zeros(1), torch.ones(1)) == 2 * 3 * 8 * 4


def test_estimate_behaves_like_memory() -> None:
    base = estimate.estimate_peak_memory("sd1", 512, 1, 16, "bf16", False)
    ckpt = estimate.estimate_peak_memory("sd1", 512, 1, 16, "bf16", True)
    batch2 = estimate.estimate_peak_memory("sd1", 512, 2, 16, "bf16", False)
    rank64 = estimate.estimate_peak_memory("sd1", 512, 1, 64, "bf16", False)
    # weights of an 860M-parameter UNet in bf16
    assert 1.55 < base.weights_gb < 1.65
    assert ckpt.step_gb < base.step_gb
    assert 1.8 * base.step_gb < batch2.step_gb < 2 * base.step_gb
    assert rank64.lora_gb > 3 * base.lora_gb
    assert base.total_gb == pytest.approx(max(base.weights_gb + base.lora_gb + base.step_gb, base.caching_gb))


def test_choose_settings_uses_memory_it_has() -> None:
    small = estimate.choose_settings(6.0, "sd1")
    large = estimate.choose_settings(24.0, "sd1")
    assert small["fits"] and large["fits"]
    assert small["estimated_peak_gb"] <= 6.0 - 1.5
    assert large["batch_size"] >= small["batch_size"]
    assert (large["batch_size"], not large["gradient_checkpointing"]) >= (small["batch_size"], not small["gradient_checkpointing"])


def test_auto_preset_checkpoints_the_smallest_share_of_blocks_that_fits() -> None:
    """SDXL at 1024 px: without checkpointing a run needs about 16 GB, with every block about 8;
    between them the preset recomputes only the share it must (less recomputation, faster)."""
    from lora_trainer.train.checkpointing import SHARES
    from lora_trainer.ui import presets
    from lora_trainer.ui.train_section import PRESET_FIELDS

    sizes = (10.0, 12.0, 14.0, 16.0, 24.0)
    # a model computing in bf16, as the estimates below (and their cached traces) assume
    picks = {gb: presets.auto_values("sdxl", gb, compute_dtype="bf16") for gb in sizes}
    got = {gb: (v["train.gradient_checkpointing"], v["train.checkpointing_share"], v["train.batch_size"])
           for gb, v in picks.items()}
    assert got[16.0][0] is False and got[24.0][0] is False
    mid = [gb for gb in sizes if 0 < got[gb][1] < 1 and got[gb][0]]
    assert mid == [10.0, 12.0, 14.0] and got[10.0][1] > got[12.0][1] > got[14.0][1], got
    for gb in mid:
        share = got[gb][1]
        fits = estimate.estimate_peak_memory("sdxl", 1024, 1, 16, "bf16", True, checkpointing_share=share)
        assert estimate.needed_gb(fits) <= gb - 1.5
        less = SHARES[SHARES.index(share) - 1]  # the next smaller share (or none) does not fit one image
        tight = estimate.estimate_peak_memory("sdxl", 1024, 1, 16, "bf16", less > 0, checkpointing_share=less or 1.0)
        assert estimate.needed_gb(tight) > gb - 1.5
    assert "train.checkpointing_share" in PRESET_FIELDS  # the tab applies it
    assert presets.preset_values("8 GB", "sdxl")["train.checkpointing_share"] == 1.0  # a fixed preset: every block


def test_bench_command_runs_tiny_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    rc = cli_main(["bench", "--steps", "2", "--warmup", "1", "--rank", "4", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "steps/s" in text and "ours / reference" in text
    data = json.loads(out.read_text())
    assert data["steps_per_s"] > 0 and data["reference_steps_per_s"] > 0
    assert data["time_to_first_step_s"] > 0 and data["peak_memory_gb"] > 0


def test_bench_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "--batch", "0"]) == 2
    assert "--batch" in capsys.readouterr().err


def test_live_bytes_counts_what_is_alive_and_not_parameter_views() -> None:
    weight = torch.nn.Parameter(torch.empty(16, 16, device="meta"), requires_grad=False)
    with LiveBytes() as live:
        x = torch.empty(4, 16, device="meta")  # 256 bytes
        y = torch.nn.functional.linear(x, weight)  # weight.t() is a view of a parameter: nothing new
        assert live.current == 2 * 4 * 16 * 4
        del x
        assert live.current == 4 * 16 * 4  # freed with its last reference
        z = y * 2
    assert live.peak == 2 * 4 * 16 * 4 and z.shape == (4, 16)


def test_live_bytes_sees_what_a_checkpointed_backward_holds() -> None:
    # Four units, each widening to 256 features inside. Without checkpointing the saved wide
    # activations are the peak; with it the peak is lower, yet more than the units' inputs:
    # while the last unit is recomputed its wide activation is alive too.
    import torch.utils.checkpoint as tuc

    units = [torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))
             .to("meta").requires_grad_(False) for _ in range(4)]

    def peak(checkpointing: bool) -> int:
        with LiveBytes() as live:
            h = torch.empty(256, 64, device="meta", requires_grad=True)
            for unit in units:
                h = tuc.checkpoint(unit, h, use_reentrant=False) if checkpointing else unit(h)
            h.sum().backward()
        return live.peak

    narrow, wide = 256 * 64 * 4, 256 * 256 * 4
    assert peak(False) >= 4 * wide
    assert peak(False) > peak(True) >= 4 * narrow + wide


def test_autocast_rules_save_fp32_copies_for_normalisations() -> None:
    # CUDA autocast runs group_norm in fp32: a bf16 model then keeps fp32 copies of the norm's
    # input for the backward pass, twice the bytes of the bf16 tensors.
    norm = torch.nn.GroupNorm(2, 8).to(device="meta", dtype=torch.bfloat16).requires_grad_(False)

    def allocated(mode: object) -> int:
        with LiveBytes() as live, mode:
            x = torch.empty(1, 8, 4, 4, device="meta", dtype=torch.bfloat16, requires_grad=True)
            out = torch.nn.functional.silu(norm(x))
        assert out.shape == x.shape
        return live.peak

    import contextlib

    plain, autocast = allocated(contextlib.nullcontext()), allocated(estimate._CudaAutocast(torch.bfloat16))
    assert autocast > plain + 8 * 4 * 4 * 2


@pytest.mark.parametrize(("arch", "resolution", "checkpointing", "stored"),
                         [("sd1", 512, False, ""), ("sd1", 512, True, ""), ("sdxl", 768, True, ""),
                          ("sd1", 512, False, "bf16")])
def test_estimate_matches_a_measured_step_and_never_under_promises(arch: str, resolution: int,
                                                                    checkpointing: bool, stored: str) -> None:
    # A real fp32 step of the tiny UNet (same block structure as the full one) on the CPU, in a
    # fresh process: what it allocated beyond weights and optimizer state vs the prediction.
    # Sizes where the step allocates 50+ MiB, so a few MiB of fixed process overhead do not count.
    # ``stored``: the frozen weights in bf16, cast to fp32 by each layer at every call (Forge's
    # manual cast), whose copies the backward pass keeps.
    from lora_trainer.bench.memcheck import measure_step_memory

    m = measure_step_memory(arch, resolution, 1, 16, checkpointing, size="tiny", threads=1, stored=stored)
    assert m.measured_gb > 0.045, m
    assert -0.05 <= m.error < 0.15, m


def test_estimate_of_the_latent_caching_matches_a_measured_vae_encode() -> None:
    # The tiny VAE encoding one 768px image on the CPU, in a fresh process, vs the prediction.
    from lora_trainer.bench.memcheck import measure_step_memory

    m = measure_step_memory("sd1", 768, size="tiny", threads=1, phase="caching")
    assert m.measured_gb > 0.045, m
    assert -0.05 <= m.error < 0.15, m


def test_the_latent_caching_is_part_of_the_estimate() -> None:
    # Latents were cached with the whole model resident (as when the H200 measured 9.82 GiB for
    # SDXL at 1024px with checkpointing, where the estimate of the step alone said 5.99): then
    # the caching set the run's peak.
    resident = estimate.estimate_peak_memory("sdxl", 1024, 1, 16, "bf16", True, unet_parked=False)
    vae = estimate.trace_latent_caching("sdxl", 1024, 1, "bf16")["vae_bytes"]
    assert vae == 83_653_863 * 4  # the SDXL VAE stays fp32
    text = get_family("sdxl").text_encoder_params * 2
    assert resident.total_gb == pytest.approx(resident.caching_gb)
    assert resident.caching_gb == pytest.approx(resident.weights_gb + (text + vae) / estimate.GiB + resident.encode_gb)
    # Now each encoder is alone on the card: the text encoders while captions are encoded (the
    # text phase drops by the UNet's weights), the VAE while latents are (the text encoders have
    # left); the UNet comes to the card after both, and training sets the peak.
    parked = estimate.estimate_peak_memory("sdxl", 1024, 1, 16, "bf16", True)
    assert resident.text_caching_gb - parked.text_caching_gb == pytest.approx(parked.weights_gb)
    assert parked.text_caching_gb == pytest.approx(text / estimate.GiB)
    assert parked.caching_gb == pytest.approx(vae / estimate.GiB + parked.encode_gb)
    assert parked.load_gb == pytest.approx((text + vae) / estimate.GiB)
    training = parked.weights_gb + parked.lora_gb + parked.step_gb
    assert parked.total_gb == pytest.approx(training) and training > max(parked.caching_gb, parked.load_gb)
    # trained text encoders are not cached: they stay beside the VAE while latents are encoded
    trained = estimate.estimate_peak_memory("sdxl", 1024, 1, 16, "bf16", True, train_text_encoder=True)
    assert trained.caching_gb == pytest.approx(parked.caching_gb + text / estimate.GiB) and trained.text_caching_gb == 0


# Peaks measured on an H200 (torch.cuda.max_memory_allocated of the whole run, bench --size full,
# rank 16, bf16, cached latents; issue #13), the UNet then resident while latents were cached and
# the norms in fp32 (autocast's rule, before train.fp32_norms): arch, resolution, batch,
# checkpointing, targets, GiB.
H200_PEAKS = [("sd1", 512, 1, False, "attention", 2.82), ("sd1", 512, 8, False, "attention", 10.4),
              ("sd1", 512, 1, True, "kohya", 2.46), ("sd1", 512, 32, False, "attention", 36.5),
              ("sdxl", 1024, 1, True, "kohya", 9.82)]


@pytest.mark.parametrize(("arch", "resolution", "batch", "checkpointing", "targets", "measured"), H200_PEAKS)
def test_estimate_covers_the_peaks_measured_on_a_gpu(arch: str, resolution: int, batch: int, checkpointing: bool,
                                                     targets: str, measured: float) -> None:
    est = estimate.estimate_peak_memory(arch, resolution, batch, 16, "bf16", checkpointing, targets=targets,
                                        unet_parked=False, fp32_norms=True)
    assert -0.05 <= (est.total_gb - measured) / measured <= 0.15, est


def test_estimate_command_predicts_a_gpu_run_and_picks_settings(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "estimate.json"
    assert cli_main(["bench", "--estimate", "--arch", "sd1", "--free-gb", "8", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    est, choice = data["estimate"], data["choice"]
    assert est["precision"] == "bf16" and est["resolution"] == 512  # a GPU run, wherever it is estimated
    assert est["total_gb"] == pytest.approx(max(est["weights_gb"] + est["lora_gb"] + est["step_gb"], est["caching_gb"]))
    assert choice["fits"] and choice["estimated_peak_gb"] <= 8 - 1.5
    assert "predicted peak" in capsys.readouterr().out


def test_estimate_command_takes_a_share_of_the_blocks_to_checkpoint(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    steps = {}
    for flag in (["--checkpointing", "0.5"], ["--checkpointing"], []):
        out = tmp_path / f"estimate{len(flag)}.json"
        assert cli_main(["bench", "--estimate", "--arch", "sd1", *flag, "--json", str(out)]) == 0
        est = json.loads(out.read_text())["estimate"]
        steps[tuple(flag)] = est["step_gb"]
        assert est["checkpointing_share"] == {2: 0.5, 1: 1.0, 0: 0.0}[len(flag)]
        assert est["gradient_checkpointing"] is bool(flag)
    assert steps[("--checkpointing",)] < steps[("--checkpointing", "0.5")] < steps[()]
    assert "checkpointing 50 % of blocks, norms in bf16:" in capsys.readouterr().out


def test_estimate_command_counts_the_traced_steps_casts_with_the_norms_in_either_dtype(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    got = {}
    for flag in ([], ["--fp32-norms"]):
        out = tmp_path / f"estimate{len(flag)}.json"
        assert cli_main(["bench", "--estimate", "--arch", "sd1", "--profile", *flag, "--json", str(out)]) == 0
        data = json.loads(out.read_text())
        got[bool(flag)] = data["traced_ops"], data["estimate"]
        assert data["estimate"]["fp32_norms"] is bool(flag)
    (fast, fast_est), (fp32, fp32_est) = got[False], got[True]
    # SD1.5's 109 norms: the input, weight and bias up to fp32 and the result back, forward and backward
    assert fp32["casts"] - fast["casts"] > 4 * 109, (fast, fp32)
    assert fp32["computing_ops"] - fast["computing_ops"] == fp32["casts"] - fast["casts"]  # only casts go
    assert fast_est["step_gb"] < fp32_est["step_gb"]
    printed = capsys.readouterr().out
    assert "norms in fp32:" in printed and f"{fast['casts']} dtype casts" in printed


def test_profile_counts_ops_casts_and_layouts_per_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "profile.json"
    assert cli_main(["bench", "--profile", "--steps", "2", "--warmup", "1", "--rank", "4", "--json", str(out)]) == 0
    rows = {r["loop"]: r for r in json.loads(out.read_text())["profiles"]}
    assert set(rows) == {"ours", "reference"}
    for r in rows.values():
        assert r["steps"] == 2
        assert r["ops_per_step"] > r["computing_ops_per_step"] > 100  # views excluded from the launches
        assert r["top_ops"] and r["top_time"]
    assert "aten ops" in capsys.readouterr().out


def test_op_counter_tells_casts_from_layout_conversions() -> None:
    from lora_trainer.bench.opcount import OpCounter

    x = torch.randn(2, 3, 4, 4)
    with OpCounter() as counter:
        x.to(torch.bfloat16)
        x.to(memory_format=torch.channels_last)
        x.float()  # no copy: already fp32
    assert (counter.casts, counter.format_conversions, counter.device_copies) == (1, 1, 0)


def test_gpu_rows_script_runs_its_rows_on_tiny_models(tmp_path: Path) -> None:
    # The script a GPU session runs, checked here on a CPU: one row, tiny models.
    import os
    import subprocess
    import sys

    script = Path(estimate.__file__).parent / "gpu_rows.sh"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(script), str(tmp_path), "--size", "tiny", "--only", "3", "--steps", "2"],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "rows.json").read_text())
    (row,) = data["rows"]
    assert row["row"]["checkpointing"] and row["result"]["steps_per_s"] > 0
    assert row["result"]["reference_steps_per_s"] > 0
    assert "default targets, checkpointing" in (tmp_path / "rows.md").read_text()


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_full_size_random_parts_build(arch: str) -> None:
    """The full-size bench models (the GPU rows) build from the packaged configs, here on meta."""
    from lora_trainer.bench.runner import random_parts

    parts = random_parts(arch, "full", device="meta", dtype=torch.bfloat16)
    assert parts["unet"].config.cross_attention_dim == (2048 if arch == "sdxl" else 768)
    assert sum(p.numel() for p in parts["unet"].parameters()) > (2_500_000_000 if arch == "sdxl" else 800_000_000)
    tokenizers = [k for k in parts if k.startswith("tokenizer")]
    assert len(tokenizers) == (2 if arch == "sdxl" else 1)
    assert parts["tokenizer"]("a photo").input_ids[0] == parts["tokenizer"].bos_token_id


@pytest.mark.parametrize("targets", ["attention", "kohya"])
def test_reference_loop_trains_the_same_modules_as_ours(targets: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--targets kohya`` gives the reference loop our default targets too: the ratio compares
    the same work."""
    from peft.tuners.lora import LoraLayer

    from lora_trainer.bench import runner
    from lora_trainer.bench.reference import REFERENCE_TARGETS
    from lora_trainer.lora.targets import default_unet_targets

    seen: dict[str, set[str]] = {}
    real = runner.run_reference_loop

    def spy(unet, *args, **kwargs):  # type: ignore[no-untyped-def]
        if targets == "kohya":
            seen["expected"] = set(default_unet_targets(unet))
        else:
            ends = tuple("." + t for t in REFERENCE_TARGETS)
            seen["expected"] = {n for n, _ in unet.named_modules() if n.endswith(ends)}
        timing = real(unet, *args, **kwargs)
        seen["adapted"] = {n for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
        return timing

    monkeypatch.setattr(runner, "run_reference_loop", spy)
    runner.time_reference(runner.BenchSpec(steps=1, warmup=0, targets=targets), torch.device("cpu"))
    assert seen["adapted"] == seen["expected"]
    if targets == "kohya":
        assert any(n.endswith("ff.net.2") for n in seen["adapted"]) and any(n.endswith("proj_in") for n in seen["adapted"])
    else:
        assert not any(n.endswith(("ff.net.2", "proj_in")) for n in seen["adapted"])


def test_rows_take_one_resolution_for_checking_full_size_rows_on_a_cpu() -> None:
    from lora_trainer.bench import rows

    sdxl = rows.ROWS[4]
    assert rows._spec(sdxl, "full", 2, 1, "cpu", None).resolution == 1024
    assert rows._spec(sdxl, "full", 2, 1, "cpu", None, 64).resolution == 64
    assert rows._spec(sdxl, "tiny", 2, 1, "cpu", None).resolution == 64
    norms_row = rows.ROWS[-1]  # the before of the norms in the compute dtype: our loop with them in fp32
    assert norms_row.fp32_norms and rows._spec(norms_row, "full", 2, 1, "cuda", None).fp32_norms
    assert not any(r.fp32_norms for r in rows.ROWS[:-1])
    env = {"device": "CPU", "torch": "t", "diffusers": "d", "peft": "p", "size": "full"}
    assert "(64 px)" in rows._title({**env, "resolution": 64})
    assert "px)" not in rows._title(env)


@pytest.mark.parametrize("network", ["dora", "loha"])
def test_estimate_of_other_adapter_kinds_matches_a_measured_step(network: str) -> None:
    from lora_trainer.bench.memcheck import measure_step_memory

    m = measure_step_memory("sd1", 512, 1, 16, False, size="tiny", threads=1, network=network)
    assert m.network == network and m.measured_gb > 0.045, m
    assert -0.05 <= m.error < 0.15, m


def test_estimate_counts_the_full_size_weights_dora_and_loha_keep() -> None:
    """DoRA's normalised weight and LoHa's delta weight are full-size per adapted layer and kept
    for the backward pass (in the autocast dtype at least): a LoRA-sized estimate under-promises."""
    import typing

    from lora_trainer.config import NetworkConfig
    from lora_trainer.errors import ConfigError
    from lora_trainer.lora.targets import default_unet_targets

    kinds = typing.get_args(typing.get_type_hints(NetworkConfig)["type"])
    assert set(estimate.NETWORK_TYPES) == set(kinds)
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(estimate.unet_config("sd1"))
    adapted = sum(unet.get_submodule(p).weight.numel() for p in default_unet_targets(unet))
    assert adapted > 250_000_000  # of the 860 M in SD1.5's UNet
    lora = estimate.estimate_peak_memory("sd1", 512, 1, 16, "bf16", False)
    for kind in ("dora", "loha"):
        other = estimate.estimate_peak_memory("sd1", 512, 1, 16, "bf16", False, network=kind)
        assert other.network == kind
        # a bf16 full-size weight per adapted layer, less what LoRA's own layers keep and these do not
        assert other.step_gb - lora.step_gb > 0.8 * adapted * 2 / estimate.GiB, kind
    with pytest.raises(ConfigError, match="network.type 'lycoris'"):
        estimate.estimate_peak_memory("sd1", 512, network="lycoris")


def test_weights_stored_narrow_and_cast_per_call_are_recast_not_kept() -> None:
    # Forge with the UNet stored in bf16 and computed in fp32: the resident weights are half the
    # size. Without checkpointing each layer casts again in the backward pass (train/recast.py),
    # so the step is the plain model's; keeping every copy had added the UNet once more in fp32.
    # With checkpointing the block being recomputed holds its copies.
    cast = ("bf16", "fp32")
    plain = estimate.estimate_peak_memory("sd1", 512, 1, 16, "fp32", False)
    narrow = estimate.estimate_peak_memory("sd1", 512, 1, 16, "fp32", False, weights_cast=cast)
    assert narrow.weights_gb == pytest.approx(plain.weights_gb / 2) and narrow.weights_cast == "bf16 -> fp32"
    assert narrow.step_gb == pytest.approx(plain.step_gb, rel=0.05)
    assert narrow.total_gb < plain.total_gb
    plain_ck = estimate.estimate_peak_memory("sd1", 512, 1, 16, "fp32", True)
    narrow_ck = estimate.estimate_peak_memory("sd1", 512, 1, 16, "fp32", True, weights_cast=cast)
    assert 0 < narrow_ck.step_gb - plain_ck.step_gb < plain.weights_gb / 4
    # The tab's auto preset (bf16 autocast), model loaded, fp16 stored and computed in fp32: 4.5 GB
    # free runs without checkpointing now (with every copy kept, it needed 4.7); the copies
    # autocast makes of fp32 weight casts (layers after a normalisation) are still kept
    assert not estimate.choose_settings(4.5, "sd1", model_resident=True, weights_cast=("fp16", "fp32"))[
        "gradient_checkpointing"]
    with pytest.raises(ConfigError, match="UNet families"):
        estimate.estimate_peak_memory("flux1", 512, weights_cast=cast)


def test_rows_and_bench_pass_a_compile_mode_to_the_run(tmp_path: Path) -> None:
    from lora_trainer.bench import rows
    from lora_trainer.bench.cli import _compile_args, _parser
    from lora_trainer.bench.runner import bench_config

    row = rows.ROWS[0]
    assert not rows._spec(row, "tiny", 2, 1, "cpu", None).compile
    spec = rows._spec(row, "tiny", 2, 1, "cpu", "reduce-overhead")
    assert spec.compile and spec.compile_mode == "reduce-overhead"
    cfg = bench_config(spec, tmp_path, tmp_path / "out", torch.device("cpu"))
    assert cfg.train.compile and cfg.train.compile_mode == "reduce-overhead"
    assert cfg.train.autosave_minutes == 0  # no checkpoint written inside the timed steps
    assert _compile_args(_parser().parse_args(["--compile-mode", "max-autotune"])) == {
        "compile": True, "compile_mode": "max-autotune"}
    assert _compile_args(_parser().parse_args(["--compile"])) == {"compile": True, "compile_mode": "default"}
    assert _compile_args(_parser().parse_args([]))["compile"] is False
    env = {"device": "CPU", "torch": "t", "diffusers": "d", "peft": "p", "size": "full"}
    assert "our UNet compiled (reduce-overhead" in rows._title({**env, "compile": True, "compile_mode": "reduce-overhead"})


def test_traced_figures_are_kept_on_disk_for_the_next_process_of_the_same_code(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trace's figures come back from the cache folder in a new process (the in-process cache
    cleared) without tracing again; another version of the code (its stamp) traces again and
    replaces the old file; the stamp follows the package's files."""
    from lora_trainer.bench import trace_cache

    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))
    args = ("sd1", 128, 1, 4, "fp32", 0.0)
    estimate.trace_step.cache_clear()
    first = estimate.trace_step(*args, size="tiny", device="cpu")
    [file] = (tmp_path / "cache" / "estimates").glob("*.json")
    assert file.name == f"{trace_cache.stamp()}.json"

    def no_trace(*a: object, **kw: object) -> None:
        raise AssertionError("traced again")

    real_step = estimate._lora_step
    monkeypatch.setattr(estimate, "_lora_step", no_trace)
    estimate.trace_step.cache_clear()  # as in a new process
    assert estimate.trace_step(*args, size="tiny", device="cpu") == first
    monkeypatch.setattr(trace_cache, "stamp", lambda: "another-version")
    estimate.trace_step.cache_clear()
    with pytest.raises(AssertionError, match="traced again"):
        estimate.trace_step(*args, size="tiny", device="cpu")
    monkeypatch.setattr(estimate, "_lora_step", real_step)
    assert estimate.trace_step(*args, size="tiny", device="cpu") == first
    assert [p.name for p in file.parent.iterdir()] == ["another-version.json"]
    estimate.trace_step.cache_clear()
    package = tmp_path / "package"
    (package / "sub").mkdir(parents=True)
    (package / "sub" / "a.py").write_text("x = 1\n")
    monkeypatch.undo()
    before = trace_cache.stamp(package)
    (package / "sub" / "a.py").write_text("x = 2\n")
    trace_cache.stamp.cache_clear()
    assert trace_cache.stamp(package) != before

"""Benchmark pieces: FLOP count, memory estimator, and a tiny end-to-end bench run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_trainer.bench import estimate
from lora_trainer.bench.flops import count_forward_flops, unet_forward_flops
from lora_trainer.cli import main as cli_main


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


def test_saved_bytes_counter_counts_activations_not_parameters() -> None:
    frozen = torch.nn.Linear(16, 16).requires_grad_(False)
    lora_down = torch.nn.Linear(16, 2, bias=False)
    counter = estimate._SavedBytes({id(p) for m in (frozen, lora_down) for p in m.parameters()})
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        frozen(x) + lora_down(x).sum()
    # The frozen layer saves only its weight (a parameter, not counted); the LoRA layer must keep
    # its input for its weight gradient: exactly x, 4 x 16 fp32 values.
    assert counter.total == 4 * 16 * 4


def test_estimate_behaves_like_memory() -> None:
    base = estimate.estimate_peak_memory("sd1", 512, 1, 16, "bf16", False)
    ckpt = estimate.estimate_peak_memory("sd1", 512, 1, 16, "bf16", True)
    batch2 = estimate.estimate_peak_memory("sd1", 512, 2, 16, "bf16", False)
    rank64 = estimate.estimate_peak_memory("sd1", 512, 1, 64, "bf16", False)
    # weights of an 860M-parameter UNet in bf16
    assert 1.55 < base.weights_gb < 1.65
    assert ckpt.activations_gb < base.activations_gb
    assert batch2.activations_gb == pytest.approx(2 * base.activations_gb)
    assert rank64.lora_gb > 3 * base.lora_gb
    assert base.total_gb == pytest.approx(base.weights_gb + base.lora_gb + base.activations_gb + base.transient_gb)


def test_choose_settings_uses_memory_it_has() -> None:
    small = estimate.choose_settings(6.0, "sd1")
    large = estimate.choose_settings(24.0, "sd1")
    assert small["fits"] and large["fits"]
    assert small["estimated_peak_gb"] <= 6.0 - 1.5
    assert large["batch_size"] >= small["batch_size"]
    assert (large["batch_size"], not large["gradient_checkpointing"]) >= (small["batch_size"], not small["gradient_checkpointing"])


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


def test_saved_bytes_counts_a_shared_input_once() -> None:
    # q, k and v LoRA layers all keep the same input: one tensor in memory, counted once.
    downs = [torch.nn.Linear(16, 2, bias=False) for _ in range(3)]
    counter = estimate._SavedBytes({id(p) for m in downs for p in m.parameters()})
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        sum(d(x).sum() for d in downs)
    assert counter.total == 4 * 16 * 4


def test_autocast_rules_save_fp32_copies_for_normalisations() -> None:
    # CUDA autocast runs group_norm in fp32: a bf16 model then keeps fp32 copies for the backward
    # pass (the norm's input and the activation's input), twice the bytes of the bf16 tensors.
    norm = torch.nn.GroupNorm(2, 8).to(device="meta", dtype=torch.bfloat16).requires_grad_(False)
    params = {id(p) for p in norm.parameters()}

    def saved(mode: object) -> int:
        counter = estimate._SavedBytes(params)
        x = torch.empty(1, 8, 4, 4, device="meta", dtype=torch.bfloat16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), mode:
            torch.nn.functional.silu(norm(x))
        return counter.total

    import contextlib

    plain, autocast = saved(contextlib.nullcontext()), saved(estimate._CudaAutocast(torch.bfloat16))
    assert autocast >= 2 * plain >= 2 * (2 * 8 * 4 * 4)


@pytest.mark.parametrize(("arch", "resolution", "checkpointing"),
                         [("sd1", 512, False), ("sd1", 512, True), ("sdxl", 768, True)])
def test_estimate_matches_a_measured_step_within_15_percent(arch: str, resolution: int, checkpointing: bool) -> None:
    # A real fp32 step of the tiny UNet (same block structure as the full one) on the CPU, in a
    # fresh process: what it allocated beyond weights and optimizer state vs the prediction.
    # Sizes where the step allocates 50+ MiB, so a few MiB of fixed process overhead do not count.
    from lora_trainer.bench.memcheck import measure_step_memory

    m = measure_step_memory(arch, resolution, 1, 16, checkpointing, size="tiny", threads=1)
    assert m.measured_gb > 0.045, m
    assert abs(m.error) < 0.15, m


def test_estimate_command_predicts_a_gpu_run_and_picks_settings(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "estimate.json"
    assert cli_main(["bench", "--estimate", "--arch", "sd1", "--free-gb", "8", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    est, choice = data["estimate"], data["choice"]
    assert est["precision"] == "bf16" and est["resolution"] == 512  # a GPU run, wherever it is estimated
    assert est["total_gb"] == pytest.approx(est["weights_gb"] + est["lora_gb"] + est["activations_gb"]
                                            + est["transient_gb"])
    assert choice["fits"] and choice["estimated_peak_gb"] <= 8 - 1.5
    assert "predicted peak" in capsys.readouterr().out

"""train.compile: the compiled run resumes bit for bit, hands the host's model back as it came,
compiles each bucket shape once (never falling back to eager), and trains with checkpointing.

Inductor's C++ build takes minutes on a CPU, so these runs compile with AOT autograd's eager
backend (dynamo's tracing, guards and recompiles, and the forward/backward graphs all run), and
with a one-level UNet: each compile costs seconds, not a minute.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft.tuners.lora import LoraLayer

from lora_trainer.errors import ConfigError
from lora_trainer.train import compiled
from lora_trainer.train.events import TrainEvent
from lora_trainer.train.trainer import Trainer
from tests.train_helpers import TinyHost, lora_tensors, stopped_and_resumed, tiny_config

dynamo = pytest.importorskip("torch._dynamo")


class CountingBackend:
    """aot_eager, counting the graphs it compiles and how often their forward runs."""

    def __init__(self) -> None:
        from torch._dynamo.backends.registry import lookup_backend

        self.aot_eager = lookup_backend("aot_eager")
        self.graphs: list[Any] = []
        self.inputs: list[list[tuple[int, ...]]] = []  # the shapes of each graph's tensor inputs
        self.calls = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.graphs.append(gm)
        self.inputs.append([tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)])
        forward = self.aot_eager(gm, example_inputs)

        def run(*args: Any) -> Any:
            self.calls += 1
            return forward(*args)

        return run


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    compiled.reset()  # graphs compiled by other tests must not be reused (or counted) here
    yield
    compiled.reset()


@pytest.fixture()
def backend(monkeypatch: pytest.MonkeyPatch) -> CountingBackend:
    counting = CountingBackend()
    monkeypatch.setattr(compiled, "BACKEND", counting)
    return counting


def small_host() -> TinyHost:
    """The tiny SD1 model with a one-level UNet (attention, no mid block): a quick graph to trace."""
    from diffusers import UNet2DConditionModel

    from lora_trainer.models.setups import bundle_from_diffusers
    from lora_trainer.models.tiny import build_components

    parts = build_components("sd1")
    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlock2D",), mid_block_type=None, up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=32, attention_head_dim=8).eval().requires_grad_(False)
    bundle = bundle_from_diffusers(parts, "sd1", "epsilon", torch.device("cpu"), torch.float32, "tiny-1-level")
    return TinyHost("sd1", bundle=bundle)


@pytest.fixture(scope="module")
def two_buckets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Square and 2:1 images: the buckets 64x64 and 96x32 (latents 8x8 and 12x4)."""
    from PIL import Image

    from lora_trainer.data.captions import write_metadata_csv

    folder = tmp_path_factory.mktemp("buckets")
    captions = {}
    for i, (w, h) in enumerate([(64, 64), (128, 64), (64, 64), (128, 64)]):
        Image.new("RGB", (w, h), (40 * i, 120, 200 - 30 * i)).save(folder / f"{i}.png")
        captions[f"{i}.png"] = f"a picture number {i}"
    write_metadata_csv(folder / "metadata.csv", captions, backup=False)
    return folder


COMPILED = {"train.compile": True, "data.enable_buckets": True, "data.min_bucket_reso": 32,
            "data.max_bucket_reso": 128, "data.bucket_step": 32, "train.max_train_steps": 6,
            "optim.learning_rate": 5e-3, "output.save_precision": "fp32", "output.overwrite": True,
            "sample.prompt": "a picture", "sample.steps": 2}


@pytest.fixture()
def recompile_limit_1() -> Iterator[None]:
    """Dynamo's own limit at 1: a second graph of the model would run eagerly, without a word."""
    with dynamo.config.patch(**{compiled._limit_name(): 1}):
        yield


def test_a_compiled_run_resumes_exactly_compiles_each_bucket_once_and_restores_the_model(
        tmp_path: Path, two_buckets: Path, backend: CountingBackend, recompile_limit_1: None) -> None:
    host = small_host()
    unet = host.bundle.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    status: list[str] = []

    def on_status(ev: TrainEvent) -> None:
        if ev.kind == "status":
            status.append(ev.message or "")

    straight = Trainer(tiny_config(two_buckets, tmp_path / "a", **COMPILED), host=host, callbacks=[on_status]).run()
    assert [m for m in status if m.startswith("torch.compile")] == [
        "torch.compile (default) of the denoiser: the first step of each new size compiles (2 batch shapes in "
        "this dataset; minutes each with inductor), the steps after it run compiled"]
    # one graph per bucket shape (no graph break, no extra recompile), and every step ran compiled
    latent_sizes = {shape[-2:] for shapes in backend.inputs for shape in shapes
                    if len(shape) == 4 and shape[:2] == (1, 4)}
    assert len(backend.graphs) == 2 and latent_sizes == {(8, 8), (4, 12)}, latent_sizes
    assert backend.calls == 6  # the sample at the end ran uncompiled: no third graph for it

    second = stopped_and_resumed(two_buckets, tmp_path / "b", host, **COMPILED)
    assert second.steps == 6 and backend.calls == 12
    a, b = lora_tensors(straight.lora_path), lora_tensors(second.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the host's model: the same bits, no LoRA layer, no compiled wrapper; dynamo's limit as it was
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, LoraLayer) for m in unet.modules())
    assert unet._compiled_call_impl is None
    assert getattr(dynamo.config, compiled._limit_name()) == 1


def test_compile_with_gradient_checkpointing_trains_like_the_eager_run_and_again_with_another_rank(
        tmp_path: Path, two_buckets: Path, backend: CountingBackend, recompile_limit_1: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    host = small_host()
    ckpt = {**COMPILED, "train.gradient_checkpointing": True, "train.max_train_steps": 2, "sample.prompt": "",
            "data.enable_buckets": False}
    eager = Trainer(tiny_config(two_buckets, tmp_path / "eager", **{**ckpt, "train.compile": False}), host=host).run()
    assert backend.calls == 0
    run = Trainer(tiny_config(two_buckets, tmp_path / "compiled", **ckpt), host=host).run()
    assert backend.calls == 2 and len(backend.graphs) == 1
    # the checkpointed regions are in the graph (recomputed in the backward), not run eagerly
    assert "checkpoint" in str(backend.graphs[0].graph)
    a, b = lora_tensors(eager.lora_path), lora_tensors(run.lora_path)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_up" in k)  # it trained
    assert host.bundle.unet._compiled_call_impl is None and not host.bundle.unet.is_gradient_checkpointing
    # A later run with another rank (a WebUI trains again): the first run's graph is still cached and
    # counts toward dynamo's limit, which must leave room for this run's own.
    monkeypatch.setattr(compiled, "_SPARE_COMPILES", 0)
    Trainer(tiny_config(two_buckets, tmp_path / "rank8", **ckpt, **{"network.rank": 8}), host=host).run()
    assert backend.calls == 4 and len(backend.graphs) == 2


def test_batch_shapes_are_each_bucket_and_its_smaller_last_batch() -> None:
    from types import SimpleNamespace as E

    plan = [[E(bucket=(64, 64))] * 2, [E(bucket=(96, 32))] * 2, [E(bucket=(64, 64))], []]
    assert compiled.batch_shapes(plan) == {(2, (64, 64)), (2, (96, 32)), (1, (64, 64))}


def test_compile_on_cuda_without_triton_is_refused_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils._triton as triton_check

    monkeypatch.setattr(triton_check, "has_triton", lambda: False)
    with pytest.raises(ConfigError, match="train.compile: torch.compile on CUDA needs Triton"):
        compiled.check_compile("cuda")
    from lora_trainer.config import build_config
    from lora_trainer.train.preflight import find_problems

    problems = find_problems(build_config({"train.compile": True, "model.device": "cuda"}), check_model=False)
    assert any("needs Triton" in str(p) for p in problems)
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    compiled.check_compile("cuda")  # no Triton needed


def test_compile_without_a_compiler_is_refused_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"train.compile: torch.compile on cpu builds its kernels with a C\+\+ comp"):
        compiled.check_compile("cpu")
    monkeypatch.setenv("CXX", "/opt/my/g++")
    compiled.check_compile("cpu")


def test_the_config_takes_compile_mode_and_kohyas_keys() -> None:
    from lora_trainer.config import COMPILE_MODES, build_config, flatten_user_dict

    cfg = build_config(flatten_user_dict({"torch_compile": True, "dynamo_mode": "reduce-overhead"}))
    assert cfg.train.compile and cfg.train.compile_mode == "reduce-overhead"
    assert build_config({}).train.compile_mode == "default" and not build_config({}).train.compile
    with pytest.raises(ConfigError, match="train.compile_mode"):
        build_config({"train.compile_mode": "fast"})
    assert "max-autotune-no-cudagraphs" in COMPILE_MODES

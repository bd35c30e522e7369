"""The Host protocol is the contract: every host implements all of it, and the tab asks the
host (its loaded model's family, label, residency, captioner) instead of testing host names.

The A1111 host runs on the v1.10.1 stand-in with the SD1/SDXL shaped models of webui_models.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import a1111_env
import pytest
from webui_models import make_model

from lora_trainer.errors import HostError
from lora_trainer.hosts.base import Host, LoadedModel
from lora_trainer.ui import presets
from lora_trainer.ui.train_section import preset_for_host


def host_classes() -> list[type]:
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.hosts.forge import ForgeHost
    from lora_trainer.hosts.standalone import StandaloneHost

    return [StandaloneHost, A1111Host, ForgeHost]


def protocol_members() -> dict[str, object]:
    members = {n: v for n, v in vars(Host).items() if not n.startswith("_")}
    members.update({n: None for n in Host.__annotations__})
    return members


@pytest.mark.parametrize("cls", host_classes(), ids=lambda c: c.__name__)
def test_every_host_implements_every_member_of_the_protocol(cls: type) -> None:
    for name, proto in protocol_members().items():
        assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
        if inspect.isfunction(proto):
            impl = getattr(cls, name)
            want = list(inspect.signature(proto).parameters)
            got = list(inspect.signature(impl).parameters)
            assert got[:len(want)] == want, f"{cls.__name__}.{name}{got} != {want}"
        elif isinstance(proto, property):
            assert isinstance(inspect.getattr_static(cls, name), property), f"{cls.__name__}.{name} is no property"


def test_loaded_model_states_a_family_or_why_not() -> None:
    assert LoadedModel("x", "sdxl").require_trainable() == "sdxl"
    flux = LoadedModel.untrainable("flux1-dev.safetensors", "Flux")
    with pytest.raises(HostError, match="is Flux; lora-trainer trains SD1, SD2 and SDXL") as e:
        flux.require_trainable()
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError):
        LoadedModel("x", "flux")  # a family the trainer has no setup for is never "trainable"
    with pytest.raises(ValueError):
        LoadedModel("x", "sd1", "but also unsupported")
    assert LoadedModel("selected.safetensors", None).require_trainable() is None  # known once loaded


@pytest.fixture
def env(webui, tmp_path: Path):
    a1111_env.reset(webui, webui.model, tmp_path / "Lora")
    yield webui
    webui.shared.sd_model = webui.model


def test_presets_follow_the_loaded_sdxl_checkpoint_with_arch_auto(env) -> None:
    from lora_trainer.hosts.a1111 import A1111Host

    env.shared.sd_model = make_model("sdxl")
    host = A1111Host()
    loaded = host.loaded_model()
    assert (loaded.family, loaded.resident) == ("sdxl", True) and "tiny-sdxl.safetensors" in loaded.label
    values = preset_for_host(host, "8 GB", "auto")
    assert values == presets.preset_values("8 GB", "sdxl", compute_dtype="fp32")
    assert values["data.resolution"] == 1024 and values != presets.preset_values("8 GB", "sd1", compute_dtype="fp32")
    # The form's arch does not override the WebUI's model: it is the one that is trained.
    assert preset_for_host(host, "12 GB", "sd1")["data.resolution"] == 1024


def test_auto_preset_counts_the_resident_webui_model(env, monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.hosts.standalone import StandaloneHost

    seen = []
    monkeypatch.setattr(presets, "auto_values",
                        lambda arch, free, resident=False, network="lora", weights_cast=None, compute_dtype=None,
                        latents_cached=True, form=None: seen.append((arch, resident, network, compute_dtype)) or {})
    monkeypatch.setattr(presets, "gpu_free_gb", lambda: 10.0)
    env.shared.sd_model = make_model("sdxl")
    preset_for_host(A1111Host(), "auto", "auto")
    preset_for_host(StandaloneHost(), "auto", "sd2", "dora")
    assert seen == [("sdxl", True, "lora", "fp32"), ("sd2", False, "dora", None)]


def test_presets_train_in_the_precision_the_webui_model_computes_in(env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A WebUI's fp16 UNet trained under bf16 autocast (or an fp32 one under any autocast) would
    have every frozen weight cast at each call and the casts kept for the backward pass (the UNet
    once more, not in the estimate): the presets train in the model's own precision instead."""
    import torch

    from lora_trainer.hosts.a1111 import A1111Host

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(presets, "gpu_free_gb", lambda: 10.0)
    host = A1111Host()
    assert host.loaded_model().compute_dtype == "fp32"  # the stand-in's model (--no-half)
    for preset in ("auto", "8 GB", "24 GB"):
        assert preset_for_host(host, preset, "auto")["train.mixed_precision"] == "no", preset
    assert presets.preset_values("auto", "sd1", 10.0)["train.mixed_precision"] == "bf16"  # no host model
    for half in (torch.float16, torch.bfloat16):
        model = make_model("sd1")
        model.model.diffusion_model.to(half)
        env.shared.sd_model = model
        name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[half]
        assert host.loaded_model().compute_dtype == name
        for preset in ("auto", "8 GB", "24 GB"):
            assert preset_for_host(host, preset, "auto")["train.mixed_precision"] == name, (preset, name)


def test_the_tab_shows_the_loaded_checkpoint_and_a_webui_send_button(env) -> None:
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.ui.tab import build_tab

    env.shared.sd_model = make_model("sdxl")
    ctx = build_tab(A1111Host()).lt_context
    field = ctx.fields["model.base_model"]
    assert "tiny-sdxl.safetensors" in str(field.value) and field.interactive is False
    ids = {getattr(b, "elem_id", None): b for b in build_tab(A1111Host(), elem_prefix="a-").blocks.values()}
    assert ids["a-send-txt2img"].visible is True
    ids = {getattr(b, "elem_id", None): b for b in build_tab(StandaloneHost(), elem_prefix="s-").blocks.values()}
    assert ids["s-send-txt2img"].visible is False


def test_an_untrainable_webui_model_is_one_line_not_a_traceback(env, tmp_path: Path) -> None:
    from lora_trainer.config import build_config
    from lora_trainer.hosts.a1111 import A1111Host

    sd3 = make_model("sd1")
    sd3.is_sd1, sd3.is_sd3 = False, True
    env.shared.sd_model = sd3
    host = A1111Host()
    assert host.loaded_model().family is None and "Stable Diffusion 3" in host.loaded_model().unsupported
    with pytest.raises(HostError, match="the loaded model is Stable Diffusion 3") as e:
        host.acquire_bundle(build_config({"data.train_data_dir": str(tmp_path)}))
    assert "\n" not in str(e.value)
    env.shared.sd_model = None
    with pytest.raises(HostError, match="no checkpoint is loaded"):
        host.acquire_bundle(build_config({"data.train_data_dir": str(tmp_path)}))


def test_the_base_model_label_follows_a_checkpoint_change_on_page_load(env) -> None:
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.ui.tab import build_tab

    env.shared.sd_model = make_model("sd1")
    blocks = build_tab(A1111Host())
    field = blocks.lt_context.fields["model.base_model"]
    assert "tiny-sd1.safetensors" in str(field.value)
    env.shared.sd_model = make_model("sdxl")  # the user picks another checkpoint in the WebUI
    loads = [fn for fn in _load_functions(blocks)]
    assert any("tiny-sdxl.safetensors" in str(fn()) for fn in loads)


def _load_functions(blocks) -> list:
    """The functions gradio calls on page load to refresh component values (3.x and 4.x+)."""
    found = []
    for block in blocks.blocks.values():
        attached = getattr(block, "load_event_to_attach", None)  # gradio 4+: (fn, every)
        if attached:
            found.append(attached[0])
        fn = getattr(block, "load_fn", None)  # gradio 3.x
        if callable(fn):
            found.append(fn)
    return found


def test_a_reloaded_page_shows_the_webuis_checkpoint_after_an_api_run(env) -> None:
    """A run started through the API carries the config's default base model ("demo"), which the
    WebUI host does not use; the page, reloaded, still names the WebUI's checkpoint."""
    from lora_trainer import jobs
    from lora_trainer.config import build_config
    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.ui.tab import build_tab

    class Finished:
        def __init__(self, *args: object) -> None:
            self.thread = None

        def start(self) -> None:
            return None

    env.shared.sd_model = make_model("sd1")
    blocks = build_tab(A1111Host())
    paths = blocks.lt_context.paths
    jobs.clear_finished()
    jobs.start(build_config({"train.max_train_steps": 4}), host=None, factory=Finished)
    try:
        fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
        restore = next(f.fn for f in fns if getattr(f.fn, "__name__", "") == "restore")
        values = restore()
    finally:
        jobs.clear_finished()
    assert values[paths.index("train.max_train_steps")] == 4  # the run's form comes back
    assert "tiny-sd1.safetensors" in values[paths.index("model.base_model")]

"""Checkpoints and resume: 3 + 3 steps give the same LoRA as 6 straight; init_from; pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_trainer.errors import ConfigError
from lora_trainer.lora.files import read_lora_file
from lora_trainer.train.events import TrainEvent
from lora_trainer.train.trainer import Trainer
from tests.train_helpers import TinyHost, lora_tensors, make_data, stopped_and_resumed, tiny_config

# Everything that draws random numbers is on: LoRA dropout, flips, caption shuffle, tag and caption dropout,
# noise offset, pyramid noise, a timestep range, min-SNR and debiased weights, accumulation over an
# epoch boundary, warmup + cosine.
BUSY = {
    "train.max_train_steps": 6, "train.batch_size": 2, "train.gradient_accumulation_steps": 2,
    "network.dropout": 0.1, "data.flip": True, "data.shuffle_captions": True, "data.caption_dropout": 0.2,
    "data.tag_dropout": 0.2,
    "data.repeats": 1, "train.noise_offset": 0.05, "train.multires_noise_iterations": 3, "train.min_snr_gamma": 5.0,
    "train.debiased_estimation_loss": True, "train.min_timestep": 50, "train.max_timestep": 950,
    "optim.lr_scheduler": "cosine", "optim.lr_warmup_steps": 2, "optim.learning_rate": 5e-3,
    "output.save_precision": "fp32", "output.overwrite": True,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"), n=5)  # odd: batches do not divide evenly


@pytest.fixture(scope="module")
def host() -> TinyHost:
    return TinyHost("sd1")


def test_three_plus_three_equals_six(tmp_path: Path, data: Path, host: TinyHost) -> None:
    straight = Trainer(tiny_config(data, tmp_path / "a", **BUSY), host=host).run()
    assert straight.steps == 6

    trainer: Trainer

    def stop_at_three(ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.step == 3:
            trainer.stop()

    trainer = Trainer(tiny_config(data, tmp_path / "b", **BUSY), host=host, callbacks=[stop_at_three])
    first = trainer.run()
    assert first.stopped and first.steps == 3
    second = Trainer(tiny_config(data, tmp_path / "b", **BUSY, **{"train.resume": "latest"}), host=host).run()
    assert second.steps == 6 and not second.stopped

    a, b = lora_tensors(straight.lora_path), lora_tensors(second.lora_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    # and the 3-step LoRA really differs from the 6-step one (the comparison above is not vacuous)
    c = lora_tensors(tmp_path / "b" / "checkpoints" / "tiny" / "step-000003" / "lora.safetensors")
    assert any(not torch.equal(v, a_v) for v, a_v in zip(c.values(), a.values(), strict=False))


@pytest.mark.parametrize("shuffled", [False, True])
def test_wildcards_and_epoch_caption_dropout_resume_exactly(tmp_path: Path, host: TinyHost, shuffled: bool) -> None:
    """Wildcard captions (lines and {a|b} drawn per sample) and caption_dropout_every_n_epochs: 2
    (2 steps an epoch here, so the stop at step 3 falls inside the dropped epoch 2): stopped and
    resumed, the run ends where the straight one does, with the text cache holding every
    expansion and "" (unshuffled) or encoding each step (shuffled)."""
    from lora_trainer.data.captions import read_captions, write_metadata_csv

    data = make_data(tmp_path / "data", n=5)
    captions = read_captions(data)
    write_metadata_csv(data / "metadata.csv", {name: f"{{bold|thin}} {cap}\n{{a|b}} {cap}, {{day|night}}"
                                               for name, cap in captions.items()}, backup=False)
    values = {**BUSY, "data.enable_wildcard": True, "data.caption_dropout_every_n_epochs": 2,
              "data.shuffle_captions": shuffled, "data.tag_dropout": 0.2 if shuffled else 0.0}
    straight = Trainer(tiny_config(data, tmp_path / "a", **values), host=host).run()
    second = stopped_and_resumed(data, tmp_path / "b", host, **values)
    assert straight.steps == second.steps == 6
    a, b = lora_tensors(straight.lora_path), lora_tensors(second.lora_path)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    c = lora_tensors(tmp_path / "b" / "checkpoints" / "tiny" / "step-000003" / "lora.safetensors")
    assert any(not torch.equal(c[k], a[k]) for k in a)


def test_save_steps_keep_last_and_resume_from_a_path(tmp_path: Path, data: Path, host: TinyHost) -> None:
    cfg = tiny_config(data, tmp_path / "out", **{"train.max_train_steps": 4, "train.save_steps": 1,
                                                 "output.keep_checkpoints": 2})
    Trainer(cfg, host=host).run()
    kept = sorted(p.name for p in (tmp_path / "out" / "checkpoints" / "tiny").iterdir())
    assert kept == ["finished.json", "step-000003", "step-000004"]
    step3 = tmp_path / "out" / "checkpoints" / "tiny" / "step-000003"
    assert {p.name for p in step3.iterdir()} == {"lora.safetensors", "training_state.pt", "state.json", "config.yaml"}
    again = Trainer(tiny_config(data, tmp_path / "out", **{"train.max_train_steps": 5, "train.resume": str(step3)}),
                    host=host).run()
    assert again.steps == 5
    with pytest.raises(ConfigError, match="train.resume"):
        Trainer(tiny_config(data, tmp_path / "out", **{"train.resume": str(tmp_path)}), host=host).run()


def test_resume_latest_without_checkpoints_starts_fresh(tmp_path: Path, data: Path, host: TinyHost) -> None:
    seen: list[TrainEvent] = []
    result = Trainer(tiny_config(data, tmp_path / "out", **{"train.resume": "latest"}), host=host,
                     callbacks=[seen.append]).run()
    assert result.steps == 2
    assert any("starting fresh" in e.message for e in seen)


def test_init_from_starts_from_the_files_weights(tmp_path: Path, data: Path, host: TinyHost) -> None:
    # A file with rank 8 / alpha 3 (not the config's 4 / 2), trained a little so it is not the init.
    src = Trainer(tiny_config(data, tmp_path / "src", **{"network.rank": 8, "network.alpha": 3.0,
                                                         "output.save_precision": "fp32"}), host=host).run()
    original = lora_tensors(src.lora_path)
    # With a learning rate of 0 and no weight decay the weights cannot move: what comes out is
    # exactly what the run started from.
    cfg = tiny_config(data, tmp_path / "out", **{"network.init_from": str(src.lora_path), "optim.unet_lr": 0.0,
                                                 "optim.weight_decay": 0.0, "output.save_precision": "fp32"})
    result = Trainer(cfg, host=host).run()
    out = lora_tensors(result.lora_path)
    assert out.keys() == original.keys()
    for k in original:
        assert torch.equal(out[k], original[k]), k
    alpha = next(v for k, v in out.items() if k.endswith(".alpha"))
    assert float(alpha) == pytest.approx(3.0)
    down = next(v for k, v in out.items() if k.endswith("lora_down.weight"))
    assert down.shape[0] == 8


def _stop_at(step: int) -> tuple[list[Trainer], object]:
    holder: list[Trainer] = []

    def cb(ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.step == step:
            holder[0].stop()
    return holder, cb


def test_a_resumed_run_continues_its_own_files(tmp_path: Path, data: Path, host: TinyHost) -> None:
    out = tmp_path / "out"
    values = {"train.max_train_steps": 4, "train.save_steps": 2}
    holder, cb = _stop_at(1)
    holder.append(Trainer(tiny_config(data, out, **values), host=host, callbacks=[cb]))
    first = holder[0].run()
    assert first.stopped and first.lora_path == out / "tiny.safetensors"
    partial = (out / "tiny.safetensors").read_bytes()

    resumed = Trainer(tiny_config(data, out, **values, **{"train.resume": "latest"}), host=host).run()
    assert resumed.steps == 4 and resumed.lora_path == out / "tiny.safetensors"
    assert (out / "tiny.safetensors").read_bytes() != partial  # the finished LoRA, not the partial one
    assert [p.read_bytes() for p in (out / ".backup").glob("tiny.safetensors.*.bak")] == [partial]  # kept
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert names == ["tiny-step000002.safetensors", "tiny-step000004.safetensors", "tiny.safetensors"]

    again = Trainer(tiny_config(data, out, **values, **{"train.resume": "latest"}), host=host).run()
    assert again.lora_path == out / "tiny.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == names  # no _v2, no _v3
    step4 = out / "checkpoints" / "tiny" / "step-000004"
    renamed = Trainer(tiny_config(data, out, **values, **{"train.resume": str(step4), "output.output_name": "new"}),
                      host=host).run()
    assert renamed.lora_path == out / "new.safetensors"  # a name changed on resume is the one used
    assert step4.is_dir()


def test_a_fresh_run_never_replaces_another_runs_files(tmp_path: Path, data: Path, host: TinyHost) -> None:
    out = tmp_path / "out"
    values = {"train.max_train_steps": 2, "train.save_steps": 2}
    Trainer(tiny_config(data, out, **values), host=host).run()
    before = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    second = Trainer(tiny_config(data, out, **values, **{"train.seed": 7}), host=host).run()
    assert second.lora_path == out / "tiny_v2.safetensors"
    assert (out / "tiny_v2-step000002.safetensors").is_file()
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors") if p.name in before} == before


@pytest.mark.parametrize("typ,lokr", [("locon", {}), ("dora", {}), ("loha", {}), ("lokr", {}),
                                      ("lokr", {"network.lokr_factor": 4, "network.lokr_decompose_both": True,
                                                "network.rank": 1})])
def test_every_network_type_resumes_exactly_and_continues_from_its_file(
        typ: str, lokr: dict, tmp_path: Path, data: Path, host: TinyHost) -> None:
    # The variants take no LoRA dropout; everything else that draws random numbers stays on.
    busy = {**BUSY, "network.dropout": 0.0, "network.type": typ, "network.alpha": 3.0,
            "network.conv_rank": 2, "network.conv_alpha": 1.0, **lokr}
    straight = Trainer(tiny_config(data, tmp_path / "a", **busy), host=host).run()
    second = stopped_and_resumed(data, tmp_path / "b", host, **busy)
    a, b = lora_tensors(straight.lora_path), lora_tensors(second.lora_path)
    assert a.keys() == b.keys() and any(k.endswith("conv1.alpha") for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    c = lora_tensors(tmp_path / "b" / "checkpoints" / "tiny" / "step-000003" / "lora.safetensors")
    assert any(not torch.equal(c[k], a[k]) for k in a)
    md = read_lora_file(straight.lora_path)[1]
    assert md["ss_network_module"] == ("networks.lora" if typ == "locon" else "lycoris.kohya")
    assert json.loads(md["ss_network_args"])["conv_dim"] == "2"
    # continue from the file with a learning rate of 0: what comes out is what went in (a LoKr
    # file's factor comes from the file, not the config, and is recorded again)
    cont = Trainer(tiny_config(data, tmp_path / "c", **{**{k: v for k, v in busy.items() if k not in lokr},
                                                         "network.init_from": str(straight.lora_path),
                                                         "optim.unet_lr": 0.0,
                                                         "optim.weight_decay": 0.0}), host=host).run()
    if typ == "lokr":
        want = {"factor": str(lokr.get("network.lokr_factor", -1)),  # rank 1: the 4 x 4 factors are pairs
                **({"decompose_both": "True"} if lokr else {})}
        for path in (straight.lora_path, cont.lora_path):
            args = json.loads(read_lora_file(path)[1]["ss_network_args"])
            assert {k: v for k, v in args.items() if k in ("factor", "decompose_both")} == want
    d = lora_tensors(cont.lora_path)
    assert d.keys() == a.keys()
    for k in a:
        assert torch.allclose(d[k], a[k], rtol=1e-6, atol=0), k


def test_runs_sharing_an_output_folder_keep_and_resume_their_own_checkpoints(
        tmp_path: Path, data: Path, host: TinyHost) -> None:
    """A WebUI's runs all use one output folder: a run named 'dog' must not replace or prune the
    checkpoint of a stopped run named 'cat', and 'cat' resumed with 'latest' goes on from its own
    checkpoint (the same rank would take the other run's weights without a word)."""
    out = tmp_path / "out"
    values = {"train.max_train_steps": 4, "sample.prompt": "a cat", "sample.every_n_steps": 2,
              "output.keep_checkpoints": 1}
    holder, cb = _stop_at(2)
    holder.append(Trainer(tiny_config(data, out, **values, **{"output.output_name": "cat"}), host=host,
                          callbacks=[cb]))
    assert holder[0].run().stopped
    cat2 = out / "checkpoints" / "cat" / "step-000002"
    saved = (cat2 / "lora.safetensors").read_bytes()
    dog = Trainer(tiny_config(data, out, **values, **{"output.output_name": "dog", "train.save_steps": 1,
                                                      "train.seed": 7}), host=host).run()
    assert dog.steps == 4
    assert (cat2 / "lora.safetensors").read_bytes() == saved  # neither replaced (same step) nor pruned
    assert sorted(p.name for p in (out / "checkpoints" / "dog").iterdir()) == ["finished.json", "step-000004"]
    assert (out / "samples" / "cat" / "step-000002.png").is_file()
    assert (out / "samples" / "dog" / "step-000002.png").is_file()

    seen: list[TrainEvent] = []
    resumed = Trainer(tiny_config(data, out, **values, **{"output.output_name": "cat", "train.resume": "latest"}),
                      host=host, callbacks=[seen.append]).run()
    assert any(e.message == f"resumed from {cat2} at step 2" for e in seen)
    assert resumed.steps == 4 and resumed.lora_path == out / "cat.safetensors"
    straight = Trainer(tiny_config(data, tmp_path / "straight", **values, **{"output.output_name": "cat"}),
                       host=host).run()
    a, b = lora_tensors(straight.lora_path), lora_tensors(resumed.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)  # cat's own run, to the bit

    seen.clear()
    Trainer(tiny_config(data, out, **values, **{"output.output_name": "bird", "train.resume": "latest"}),
            host=host, callbacks=[seen.append]).run()
    said = [e.message for e in seen if "starting fresh" in e.message]
    assert said == [f"train.resume: no checkpoint of 'bird' in {out / 'checkpoints'} yet "
                    "(there are checkpoints of cat, dog); starting fresh"]


def test_latest_still_finds_a_checkpoint_of_the_older_layout(tmp_path: Path, data: Path, host: TinyHost) -> None:
    """Checkpoints written straight into checkpoints/ (before each run had its own folder) are
    resumed by a run of their name, and never by a run of another name."""
    out = tmp_path / "out"
    holder, cb = _stop_at(1)
    holder.append(Trainer(tiny_config(data, out, **{"train.max_train_steps": 3}), host=host, callbacks=[cb]))
    holder[0].run()
    (out / "checkpoints" / "tiny" / "step-000001").rename(out / "checkpoints" / "step-000001")
    (out / "checkpoints" / "tiny").rmdir()
    seen: list[TrainEvent] = []
    other = Trainer(tiny_config(data, out, **{"train.max_train_steps": 3, "train.resume": "latest",
                                              "output.output_name": "other"}), host=host, callbacks=[seen.append]).run()
    assert other.steps == 3 and any("starting fresh" in e.message for e in seen)
    seen.clear()
    again = Trainer(tiny_config(data, out, **{"train.max_train_steps": 3, "train.resume": "latest"}), host=host,
                    callbacks=[seen.append]).run()
    assert again.lora_path == out / "tiny.safetensors"
    assert any(e.message == f"resumed from {out / 'checkpoints' / 'step-000001'} at step 1" for e in seen)


def test_autosave_keeps_a_checkpoint_every_few_minutes_without_step_loras(
        tmp_path: Path, data: Path, host: TinyHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no save_steps, a run still saves a checkpoint when train.autosave_minutes passed since
    the last one (here each step takes a minute of a turned-forward clock), so a run killed
    with its WebUI loses at most that much; no step LoRAs are added to the LoRA folder."""
    from lora_trainer.train import session

    now = [0.0]
    monkeypatch.setattr(session, "clock", lambda: now[0])

    def a_minute_per_step(ev: TrainEvent) -> None:
        if ev.kind == "step":
            now[0] += 60.0

    out = tmp_path / "out"
    result = Trainer(tiny_config(data, out, **{"train.max_train_steps": 5, "train.autosave_minutes": 1.5}),
                     host=host, callbacks=[a_minute_per_step]).run()
    assert result.steps == 5
    assert sorted(p.name for p in (out / "checkpoints" / "tiny").iterdir()) == [
        "finished.json", "step-000002", "step-000004"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["tiny.safetensors"]
    state = json.loads((out / "checkpoints" / "tiny" / "step-000004" / "state.json").read_text())
    assert state["step"] == 4 and state["total_steps"] == 5

    off = Trainer(tiny_config(data, tmp_path / "off", **{"train.max_train_steps": 3, "train.autosave_minutes": 0}),
                  host=host, callbacks=[a_minute_per_step]).run()
    assert off.steps == 3 and not (tmp_path / "off" / "checkpoints").exists()


def test_resuming_a_checkpoint_of_other_network_settings_says_what_to_do(
        tmp_path: Path, data: Path, host: TinyHost) -> None:
    out = tmp_path / "out"
    Trainer(tiny_config(data, out, **{"train.max_train_steps": 1, "train.save_steps": 1}), host=host).run()
    step1 = out / "checkpoints" / "tiny" / "step-000001"
    with pytest.raises(ConfigError) as e:
        Trainer(tiny_config(data, out, **{"train.resume": str(step1), "network.rank": 8}), host=host).run()
    said = str(e.value)
    assert said.startswith(f"train.resume: {step1} was saved by a run with other network settings (")
    assert said.endswith("resume with the settings in its config.yaml, or clear train.resume to start afresh")


def test_a_fresh_run_leaves_a_crashed_runs_checkpoints_of_the_same_name_alone(
        tmp_path: Path, data: Path, host: TinyHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that crashed wrote checkpoints but no LoRA: a fresh run of the same name (Start, not
    Continue) takes the next name, so the crashed run's checkpoints stay to be continued."""
    from lora_trainer.train.session import RunSession

    out = tmp_path / "out"
    real_step, steps = RunSession.optimizer_step, [0]

    def dies_at_the_third(self: RunSession) -> None:
        steps[0] += 1
        if steps[0] == 3:
            raise RuntimeError("the process died")
        real_step(self)

    values = {"train.max_train_steps": 4, "train.save_steps": 2, "output.save_step_loras": False}
    with monkeypatch.context() as m:
        m.setattr(RunSession, "optimizer_step", dies_at_the_third)
        with pytest.raises(RuntimeError, match="the process died"):
            Trainer(tiny_config(data, out, **values), host=host).run()
    crashed = out / "checkpoints" / "tiny" / "step-000002"
    saved = (crashed / "lora.safetensors").read_bytes()
    assert not list(out.glob("*.safetensors"))
    fresh = Trainer(tiny_config(data, out, **values, **{"train.seed": 7}), host=host).run()
    assert fresh.lora_path == out / "tiny_v2.safetensors"
    assert (crashed / "lora.safetensors").read_bytes() == saved
    assert (out / "checkpoints" / "tiny_v2" / "step-000004").is_dir()
    resumed = Trainer(tiny_config(data, out, **values, **{"train.resume": str(crashed)}), host=host).run()
    assert resumed.lora_path == out / "tiny.safetensors" and resumed.steps == 4  # the crashed run, finished


def test_loraplus_trains_the_up_matrices_faster_and_resumes_exactly(tmp_path: Path, data: Path, host: TinyHost) -> None:
    """optim.loraplus_lr_ratio: a run whose up matrices learn 16 times faster ends elsewhere than
    the plain one, its file says so (ss_loraplus_lr_ratio), and stopped and resumed it ends
    where the straight run does (the optimizer's extra groups come back from the checkpoint)."""
    plus = {**BUSY, "optim.loraplus_lr_ratio": 16.0}
    straight = Trainer(tiny_config(data, tmp_path / "a", **plus), host=host).run()
    plain = Trainer(tiny_config(data, tmp_path / "plain", **BUSY), host=host).run()
    second = stopped_and_resumed(data, tmp_path / "b", host, **plus)
    a, b, p = lora_tensors(straight.lora_path), lora_tensors(second.lora_path), lora_tensors(plain.lora_path)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    ups = [k for k in a if "lora_up" in k]  # they start at zero: their size is how far they went
    up_plus, up_plain = (sum(float(t[k].abs().sum()) for k in ups) for t in (a, p))
    print(f"sum |lora_up| after 6 steps: {up_plus:.3f} with LoRA+ 16, {up_plain:.3f} without")
    assert up_plus > 2 * up_plain and read_lora_file(straight.lora_path)[1]["ss_loraplus_lr_ratio"] == "16.0"
    assert "ss_loraplus_lr_ratio" not in read_lora_file(plain.lora_path)[1]


def test_an_adafactor_run_with_a_polynomial_schedule_resumes_exactly(tmp_path: Path, data: Path,
                                                                      host: TinyHost) -> None:
    """Adafactor (kohya's SDXL recipe, at the schedule's rate) keeps its factored moments in the
    checkpoint: stopped and resumed, a run ends where the straight one does."""
    values = {**BUSY, "optim.optimizer": "adafactor", "optim.lr_scheduler": "polynomial",
              "optim.lr_scheduler_power": 2.0}
    straight = Trainer(tiny_config(data, tmp_path / "a", **values), host=host).run()
    second = stopped_and_resumed(data, tmp_path / "b", host, **values)
    a, b = lora_tensors(straight.lora_path), lora_tensors(second.lora_path)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert read_lora_file(straight.lora_path)[1]["ss_optimizer"] == "adafactor"


def test_max_norm_regularization_keeps_every_module_within_the_limit_and_resumes_exactly(
        tmp_path: Path, data: Path, host: TinyHost) -> None:
    """network.scale_weight_norms (kohya's): no module of the written LoRA has an update
    (up @ down * alpha / rank) larger than the limit, where without it some do; the file says
    so (ss_scale_weight_norms); stopped and resumed, the run ends where the straight one does."""
    free = Trainer(tiny_config(data, tmp_path / "free", **BUSY), host=host).run()

    def norms(path: Path) -> list[float]:
        t = lora_tensors(path)
        ups = [k for k in t if k.endswith("lora_up.weight")]
        return [float((t[k].flatten(1) @ t[k.replace("lora_up", "lora_down")].flatten(1)).norm())
                * float(t[k.replace("lora_up.weight", "alpha")]) / t[k].shape[1] for k in ups]

    limit = sorted(norms(free.lora_path))[-5]  # the largest few are above it
    capped = {**BUSY, "network.scale_weight_norms": limit}
    straight = Trainer(tiny_config(data, tmp_path / "a", **capped), host=host).run()
    assert max(norms(straight.lora_path)) <= limit * (1 + 1e-5) < max(norms(free.lora_path))
    assert float(read_lora_file(straight.lora_path)[1]["ss_scale_weight_norms"]) == pytest.approx(limit)
    second = stopped_and_resumed(data, tmp_path / "b", host, **capped)
    a, b = lora_tensors(straight.lora_path), lora_tensors(second.lora_path)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_input_perturbation_random_offsets_and_a_huber_loss_resume_exactly(
        tmp_path: Path, data: Path, host: TinyHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """kohya's ip_noise_gamma (random strength), noise_offset_random_strength, adaptive_noise_scale
    and a Huber loss on its snr schedule draw from the run's generator: stopped and resumed, a run
    ends where the straight one does; each changes what is trained; the file names them as
    kohya does."""
    from lora_trainer.train import session

    values = {**BUSY, "train.ip_noise_gamma": 0.1, "train.ip_noise_gamma_random_strength": True,
              "train.noise_offset_random_strength": True, "train.adaptive_noise_scale": 0.01,
              "train.loss_type": "huber", "train.huber_c": 0.1, "train.huber_schedule": "snr"}
    straight = Trainer(tiny_config(data, tmp_path / "a", **values), host=host).run()
    second = stopped_and_resumed(data, tmp_path / "b", host, **values)
    a, b = lora_tensors(straight.lora_path), lora_tensors(second.lora_path)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)

    def differs(out: str, **change: object) -> bool:
        other = lora_tensors(Trainer(tiny_config(data, tmp_path / out, **{**values, **change}), host=host).run()
                             .lora_path)
        return any(not torch.equal(v, other[k]) for k, v in a.items())

    assert differs("adaptive", **{"train.adaptive_noise_scale": 0.0})  # no draw changes: the offset's effect
    assert differs("l2", **{"train.loss_type": "l2"})
    # the same draws with the perturbation thrown away: the model's input is what differs
    real = session.perturbed_noise
    monkeypatch.setattr(session, "perturbed_noise", lambda noise, *a, **k: (real(noise, *a, **k), noise)[1])
    assert differs("drawn_not_used")
    meta = read_lora_file(straight.lora_path)[1]
    assert (meta["ss_ip_noise_gamma"], meta["ss_ip_noise_gamma_random_strength"]) == ("0.1", "True")
    assert (meta["ss_noise_offset_random_strength"], meta["ss_adaptive_noise_scale"]) == ("True", "0.01")
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_c"]) == ("huber", "snr", "0.1")


def test_an_alpha_mask_run_resumes_exactly(tmp_path: Path, host: TinyHost) -> None:
    """alpha_mask on transparent PNGs, flipped and with cached latents (masks recomputed from
    the images): 3 + 3 steps give the 6-step LoRA."""
    from tests.train_helpers import make_transparent_data

    data = make_transparent_data(tmp_path / "data", n=5)
    values = {**BUSY, "data.alpha_mask": True}
    straight = Trainer(tiny_config(data, tmp_path / "a", **values), host=host).run()
    second = stopped_and_resumed(data, tmp_path / "b", host, **values)
    assert straight.steps == second.steps == 6
    a, b = lora_tensors(straight.lora_path), lora_tensors(second.lora_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_color_augmentation_with_random_crops_resumes_exactly(tmp_path: Path, data: Path, host: TinyHost) -> None:
    """kohya's color_aug (data.color_aug) changes the pixels each time an image is used, so the
    latents are encoded every step; stopped and resumed, the run ends where the straight one does;
    it changes what is trained and the file records it."""
    values = {**BUSY, "data.color_aug": True, "data.crop": "random"}
    seen: list[TrainEvent] = []
    straight = Trainer(tiny_config(data, tmp_path / "a", **values), host=host, callbacks=[seen.append]).run()
    assert any(e.message == "latent cache skipped: random crops and color augmentation change the latents every "
                            "epoch" for e in seen)
    second = stopped_and_resumed(data, tmp_path / "b", host, **values)
    a, b = lora_tensors(straight.lora_path), lora_tensors(second.lora_path)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    plain = lora_tensors(Trainer(tiny_config(data, tmp_path / "c", **{**values, "data.color_aug": False}),
                                 host=host).run().lora_path)
    assert any(not torch.equal(v, plain[k]) for k, v in a.items())
    assert read_lora_file(straight.lora_path)[1]["ss_color_aug"] == "True"


def test_block_weights_and_ranks_resume_exactly_and_report_the_base_rate(
        tmp_path: Path, data: Path, host: TinyHost) -> None:
    """kohya's block weights (a down block at 0, the mid block at 2) and block ranks: stopped and
    resumed, a run ends where the straight one does; the file has no module in the left-out
    blocks, the others at their block's rank, and records the settings; the run reports the
    base learning rate, not a block's."""
    from lora_trainer.lora import blocks

    dims = ",".join(str(2 + b % 2) for b in range(25))
    values = {**BUSY, "network.down_lr_weight": "1,1,0.5,1,1,1,1,0", "network.mid_lr_weight": "2",
              "network.block_dims": dims, "optim.lr_scheduler": "constant", "optim.lr_warmup_steps": 0}
    seen: list[TrainEvent] = []
    straight = Trainer(tiny_config(data, tmp_path / "a", **values), host=host, callbacks=[seen.append]).run()
    second = stopped_and_resumed(data, tmp_path / "b", host, **values)
    a, b = lora_tensors(straight.lora_path), lora_tensors(second.lora_path)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    unet = {k.split(".")[0] for k in a if k.startswith("lora_unet_")}
    index = {k: blocks.block_index("sd1", k) for k in unet}
    assert 7 not in index.values() and {2, 12} <= set(index.values())
    assert all(a[f"{k}.lora_down.weight"].shape[0] == 2 + i % 2 for k, i in index.items())
    args = json.loads(read_lora_file(straight.lora_path)[1]["ss_network_args"])
    assert (args["down_lr_weight"], args["mid_lr_weight"], args["block_dims"]) == ("1,1,0.5,1,1,1,1,0", "2", dims)
    assert {ev.lr for ev in seen if ev.lr is not None} == {BUSY["optim.learning_rate"]}

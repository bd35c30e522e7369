"""Checks that need no model run before anything loads: in train, config --check and the app's Start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lora_trainer.cli import main
from lora_trainer.config import TrainConfig
from lora_trainer.errors import LoraTrainerError, OutputError
from lora_trainer.train.events import TrainEvent
from lora_trainer.train.preflight import find_problems
from lora_trainer.train.trainer import Trainer
from tests.train_helpers import TinyHost, make_data, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"), n=2)


class CountingHost(TinyHost):
    name = "standalone"  # loaded_model() is None: it loads model.base_model, so that is checked too

    def __init__(self) -> None:
        super().__init__()
        self.acquired = 0

    def acquire_bundle(self, config: TrainConfig) -> Any:
        self.acquired += 1
        return super().acquire_bundle(config)


def _bad_values(tmp: Path, data: Path) -> list[tuple[dict[str, Any], str]]:
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "a_file").write_text("x")
    (tmp / "model.ckpt").write_bytes(b"x")
    (tmp / "folder_model").mkdir(exist_ok=True)
    return [
        ({"output.output_name": "sub/x"}, "contains '/'"),
        ({"output.output_name": "a..b"}, "contains '..'"),
        ({"output.output_name": "x" * 115}, "too long for the step LoRAs"),
        ({"model.base_model": ""}, "model.base_model is empty"),
        ({"model.base_model": str(tmp / "missing.safetensors")}, "does not exist"),
        ({"model.base_model": str(tmp / "folder_model")}, "no model_index.json"),
        ({"model.base_model": str(tmp / "model.ckpt")}, "allow_pickle"),
        ({"model.vae": str(tmp / "no_vae.safetensors")}, "model.vae"),
        ({"data.train_data_dir": ""}, "data.train_data_dir is empty"),
        ({"data.train_data_dir": str(tmp / "nowhere")}, "does not exist"),
        ({"data.train_data_dir": str(tmp / "empty")}, "no images"),
        ({"data.reg_data_dir": str(tmp / "nowhere")}, "data.reg_data_dir"),
        ({"data.metadata_path": str(tmp / "nowhere.csv")}, "data.metadata_path"),
        ({"network.init_from": str(tmp / "nowhere.safetensors")}, "network.init_from"),
        ({"train.resume": str(tmp / "empty")}, "train.resume"),
        ({"output.output_dir": str(tmp / "a_file")}, "is a file"),
        ({"output.output_dir": str(tmp / "a_file" / "out")}, "cannot be created"),
    ]


def test_each_problem_is_refused_before_the_model_loads(tmp_path: Path, data: Path) -> None:
    for values, fragment in _bad_values(tmp_path, data):
        host = CountingHost()
        events: list[TrainEvent] = []
        cfg = tiny_config(data, tmp_path / "out", **{"train.max_train_steps": 40, **values})
        with pytest.raises(LoraTrainerError) as e:
            Trainer(cfg, host=host, callbacks=[events.append]).run()
        assert fragment in str(e.value) and "\n" not in str(e.value), (values, str(e.value))
        assert host.acquired == 0 and not [ev for ev in events if ev.kind == "step"], values


def test_a_good_config_has_no_problems(tmp_path: Path, data: Path) -> None:
    assert find_problems(tiny_config(data, tmp_path / "new" / "out")) == []


def test_cli_refuses_a_name_with_a_slash_before_training(tmp_path: Path, data: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train", "--no-progress", "--set", "base_model=demo", "--set", f"train_data_dir={data}",
               "--set", "resolution=64", "--set", "enable_buckets=false", "--set", "min_image_size=32",
               "--set", f"output_dir={tmp_path / 'out'}", "--set", "output_name=sub/x",
               "--set", "save_steps=0", "--set", "max_train_steps=40"])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.count("\n") == 1 and "contains '/'" in captured.err
    assert "step" not in captured.out and not (tmp_path / "out" / "checkpoints").exists()


def test_config_check_lists_every_problem(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base_model: {tmp_path / 'missing'}\ntrain_data_dir: ''\noutput_name: ../x\n"
                   f"output_dir: {tmp_path / 'out'}\n")
    assert main(["config", "--check", str(cfg)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert any("output.output_name" in e for e in err) and any("model.base_model" in e for e in err)
    assert any("data.train_data_dir is empty" in e for e in err)


def test_config_check_scans_the_dataset(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train_data_dir: {data}\nresolution: 64\nmin_image_size: 100000\n"
                   f"output_dir: {tmp_path / 'out'}\n")
    assert main(["config", "--check", str(cfg)]) == 2
    assert "none of the 2 images" in capsys.readouterr().err
    assert main(["config", "--check", str(cfg), "--set", "min_image_size=32"]) == 0
    out = capsys.readouterr().out
    assert "2 usable" in out and "OK" in out
    assert not (tmp_path / "out").exists()  # a check writes nothing


def test_train_check_does_not_train(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--check", "--set", f"train_data_dir={data}", "--set", "resolution=64",
            "--set", "min_image_size=32", "--set", f"output_dir={tmp_path / 'out'}"]
    assert main(args) == 0
    assert "OK" in capsys.readouterr().out and not (tmp_path / "out").exists()
    assert main([*args, "--set", "output_name=a/b"]) == 2
    assert "contains '/'" in capsys.readouterr().err


def test_train_help_shows_check(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--check" in capsys.readouterr().out


def test_app_start_refuses_before_a_thread_starts(tmp_path: Path, data: Path) -> None:
    from lora_trainer import jobs

    jobs.clear_finished()
    host = CountingHost()
    with pytest.raises(OutputError, match="contains '/'"):
        jobs.start(tiny_config(data, tmp_path / "out", **{"output.output_name": "sub/x"}), host)
    assert jobs.current() is None and host.acquired == 0

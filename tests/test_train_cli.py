"""The train / config / demo commands, in process, end to end on the embedded demo model."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import yaml

from lora_trainer.cli import main
from lora_trainer.config import load_config
from tests.train_helpers import lora_tensors, make_data


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_train_from_yaml_with_flat_aliases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_data(tmp_path / "data", n=3)
    cfg = _write(tmp_path / "my.yaml", {
        "base_model": "demo", "train_data_dir": str(data), "resolution": 64, "enable_bucket": False,
        "lora_rank": 4, "network_alpha": 2, "max_train_steps": 2, "learning_rate": 1e-3,
        "lr_scheduler": "linear", "lr_warmup_steps": 1, "batch_size": 2, "seed": 3,
        "output_dir": str(tmp_path / "out"), "output_name": "cli_lora", "save_steps": 1,
    })
    rc = main(["train", "--config", str(cfg), "--set", "network.dropout=0.1", "--set", "output.tensorboard=false"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lora = tmp_path / "out" / "cli_lora.safetensors"
    assert lora.is_file() and f"LoRA: {lora}" in out
    tensors = lora_tensors(lora)
    down = next(v for k, v in tensors.items() if k.endswith("lora_down.weight"))
    assert down.shape[0] == 4
    used = load_config(tmp_path / "out" / "config.yaml")
    assert used.network.dropout == 0.1 and used.train.batch_size == 2 and used.optim.lr_scheduler == "linear"
    assert (tmp_path / "out" / "checkpoints" / "cli_lora" / "step-000002").is_dir()


@pytest.mark.parametrize("content,expected", [
    ({"lora_rnk": 4}, "did you mean 'lora_rank'"),
    ({"network": {"rank": 0}}, "network.rank"),
    ({"optim": {"lr_scheduler": "cosin"}}, "did you mean 'cosine'"),
    ({"train_data_dir": "/nonexistent/images", "max_train_steps": 1}, "/nonexistent/images"),
])
def test_train_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           content: dict, expected: str) -> None:
    cfg = _write(tmp_path / "bad.yaml", {"output_dir": str(tmp_path / "out"), **content})
    rc = main(["train", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err


def test_train_needs_a_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train"]) == 2
    assert "--config" in capsys.readouterr().err


def test_config_example_reference_and_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--example"]) == 0
    example = capsys.readouterr().out
    path = tmp_path / "example.yaml"
    path.write_text(example)
    assert load_config(path).network.rank == 16
    assert main(["config", "--reference"]) == 0
    assert "| `network.rank` |" in capsys.readouterr().out
    data = make_data(tmp_path / "data", n=2)
    assert main(["config", "--check", str(path), "--set", "lora_rank=8", "--set", f"train_data_dir={data}",
                 "--set", "min_image_size=32", "--set", f"output_dir={tmp_path / 'out'}"]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["config", "--check", str(path)]) == 2  # the example has no data folder yet
    assert "data.train_data_dir is empty" in capsys.readouterr().err
    bad = _write(tmp_path / "bad.yaml", {"epochz": 3})
    assert main(["config", "--check", str(bad)]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err


def test_task_llm_is_handed_to_the_llm_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    fake = types.ModuleType("lora_trainer.llm.cli")
    fake.train_main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "lora_trainer.llm.cli", fake)
    cfg = _write(tmp_path / "llm.yaml", {"task": "llm"})
    assert main(["train", "--config", str(cfg), "--check"]) == 0
    assert calls == [["--config", str(cfg), "--check"]]


def test_demo_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["demo", "--dir", str(tmp_path / "demo"), "--steps", "3", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lora = tmp_path / "demo" / "output" / "demo_lora.safetensors"
    assert lora.is_file() and str(lora) in out
    assert list((tmp_path / "demo" / "output" / "samples" / "demo_lora").glob("*.png"))


def test_progress_bar_shows_step_loss_and_rate(capsys: pytest.CaptureFixture[str]) -> None:
    from lora_trainer.train.cli import ProgressBar
    from lora_trainer.train.events import TrainEvent

    bar = ProgressBar(enabled=True)
    bar(TrainEvent("status", message="caching latents"))
    for step in (1, 2, 3):
        bar(TrainEvent("step", step=step, total_steps=3, loss=0.5 / step, lr=1e-4, it_per_s=2.0, eta_s=3 - step))
    bar(TrainEvent("checkpoint", step=3, message="checkpoint out/checkpoints/step-000003"))
    bar(TrainEvent("done", step=3, path="out/x.safetensors", message="done: out/x.safetensors"))
    captured = capsys.readouterr()
    assert "caching latents" in captured.out
    assert "3/3" in captured.err and "loss=0.1667" in captured.err and "lr=1.00e-04" in captured.err
    assert "checkpoint out/checkpoints/step-000003" in captured.out + captured.err
    assert bar.bar is None  # closed at the end

    plain = ProgressBar(enabled=False)
    for step in range(1, 11):
        plain(TrainEvent("step", step=step, total_steps=10, loss=0.25, it_per_s=4.0, eta_s=0.0))
    assert "step 10/10 loss 0.2500 4.00 it/s eta 0s" in capsys.readouterr().out


def test_config_check_of_an_llm_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _write(tmp_path / "llm.yaml", {"task": "llm", "base_model": str(tmp_path / "gpt2")})
    assert main(["config", "--check", str(cfg)]) == 0
    assert "OK (text LoRA" in capsys.readouterr().out
    bad = _write(tmp_path / "bad.yaml", {"task": "llm", "lora_rnk": 4})
    assert main(["config", "--check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lora_rnk" in err

"""Text-LoRA command line end to end: train from a YAML, then generate with the adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_trainer.cli import main as cli_main
from lora_trainer.llm.cli import generate_main, train_main
from lora_trainer.llm.tiny import build_tiny_model

REPLY = "Thanks for reaching out! Your order has shipped."


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm_cli")
    model = build_tiny_model(root / "gpt2", "gpt2", seed=2)
    data = root / "support.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Where is order {i}?", "response": REPLY})
                              for i in range(8)) + "\n", encoding="utf-8")
    cfg = root / "llm.yaml"
    cfg.write_text(f"task: llm\nbase_model: {model}\ntrain_file: {data}\nlora_rank: 8\nlora_alpha: 16\n"
                   f"learning_rate: 0.02\nbatch_size: 4\nmax_length: 64\noutput_dir: {root / 'out'}\n"
                   "lora_dropout: 0.0\nlr_scheduler: constant\n", encoding="utf-8")
    # Through the top-level command: 'train' hands a 'task: llm' config to text LoRA.
    assert cli_main(["train", "--config", str(cfg), "--set", "max_steps=15", "--set", "output.output_name=support",
                     "--no-progress"]) == 0
    return {"root": root, "model": model, "config": cfg, "adapter": root / "out" / "support"}


def test_cli_train_writes_adapter(trained: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    adapter = trained["adapter"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and set(cfg["target_modules"]) == {"c_attn", "c_proj", "c_fc"}
    assert Path(cfg["base_model_name_or_path"]) == trained["model"]
    info = json.loads((adapter / "lora_trainer.json").read_text())
    assert info["steps"] == 15 and info["final_loss"] < 4.5  # from ~6.0 (uniform over 400 tokens)


def test_cli_generate_uses_the_adapter(trained: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--prompt", "Where is order 3?", "--chat", "--temperature", "0", "--max-new-tokens", "12"]
    capsys.readouterr()
    assert cli_main(["generate", "--adapter", str(trained["adapter"]), *args]) == 0
    tuned = capsys.readouterr().out.strip()
    assert generate_main(["--model", str(trained["model"]), *args]) == 0
    base = capsys.readouterr().out.strip()
    # 15 steps on one reply: greedy decoding with the LoRA starts reciting it; the base model does not.
    assert tuned.startswith("Thanks for reaching out"), tuned
    assert not base.startswith("Thanks for reaching out"), base


def test_cli_check_prints_report(trained: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert train_main(["--config", str(trained["config"]), "--set", "max_length=28", "--check"]) == 0
    out = capsys.readouterr().out
    assert "8 records (8 train, 0 eval)" in out and "8 samples longer than max_length were truncated" in out


def test_cli_errors_are_one_line(trained: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.base_model:") and "no config.json" in err and "\n" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{oops}\n', encoding="utf-8")
    from lora_trainer.errors import DatasetError

    with pytest.raises(DatasetError, match="line 2: invalid JSON"):
        train_main(["--config", str(trained["config"]), "--set", f"train_file={bad}", "--check"])

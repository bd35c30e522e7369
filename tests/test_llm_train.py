"""Text-LoRA training on tiny GPT-2 and Llama models built offline from config."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lora_trainer.errors import ConfigError
from lora_trainer.llm.checkpoint import find_checkpoint
from lora_trainer.llm.config import build_llm_config
from lora_trainer.llm.data import build_datasets, collate
from lora_trainer.llm.model import add_lora, detect_target_modules, load_model
from lora_trainer.llm.tiny import build_tiny_model
from lora_trainer.llm.train import TextLoraTrainer, epoch_groups, make_scheduler, with_run_precision

REPLY = "Thanks for reaching out! Your order has shipped."


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_llms")
    return {fam: build_tiny_model(root / fam, fam, seed=1) for fam in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("llm_data") / "support.jsonl"
    rows = [{"prompt": f"Where is my order {i}?", "response": REPLY} for i in range(10)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return f


def config(model: Path, data: Path, out: Path, **kw):
    values = {"base_model": str(model), "train_file": str(data), "output_dir": str(out), "batch_size": 2,
              "max_steps": 4, "learning_rate": 1e-2, "lora_dropout": 0.0, "tensorboard": False, **kw}
    return build_llm_config(values)


def batch_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def fixed_batch(cfg, tokenizer) -> dict[str, torch.Tensor]:
    train, _, _ = build_datasets(cfg.data, tokenizer, cfg.train.seed)
    return collate(train[:4], tokenizer.pad_token_id)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_default_targets_per_family(models: dict[str, Path]) -> None:
    cfg = config(models["gpt2"], Path("x"), Path("y"))
    gpt2, _, _ = load_model(cfg.model)
    assert detect_target_modules(gpt2) == ["c_attn", "c_fc", "c_proj"]
    cfg.model.base_model = str(models["llama"])
    llama, _, _ = load_model(cfg.model)
    llama_targets = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert detect_target_modules(llama) == llama_targets
    import transformers

    small = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1}
    # families newer than the installed transformers (4.30 has neither) cannot be loaded there at all
    for family in ("Qwen2", "Mistral"):
        if hasattr(transformers, f"{family}ForCausalLM"):
            model = getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, f"{family}Config")(**small))
            assert detect_target_modules(model) == llama_targets


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_lowers_loss_and_reloaded_adapter_matches(family: str, models, data_file, tmp_path: Path) -> None:
    from peft import PeftModel

    cfg = config(models[family], data_file, tmp_path, max_steps=6, lr_scheduler="constant")
    trainer = TextLoraTrainer(cfg)
    result = trainer.run()
    assert result.steps == 6 and not result.stopped
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (result.adapter_path / name).is_file()
    base, tok, _ = load_model(cfg.model)
    batch = fixed_batch(cfg, tok)
    before = batch_loss(base, batch)
    trained_logits = trainer.model.eval()(**batch).logits.detach()
    reloaded = PeftModel.from_pretrained(base, str(result.adapter_path)).eval()
    after = batch_loss(reloaded, batch)
    assert after < before - 0.15, (before, after)
    assert torch.equal(reloaded(**batch).logits.detach(), trained_logits)
    # The LoRA really does something: without it the logits differ.
    with reloaded.disable_adapter():
        assert not torch.allclose(reloaded(**batch).logits, trained_logits)


def test_resume_equals_straight_run(models, data_file, tmp_path: Path) -> None:
    # Dropout on (RNG matters), accumulation, and a stop in the middle of the second epoch.
    common = {"max_steps": 6, "gradient_accumulation_steps": 2, "lora_dropout": 0.1, "lr_scheduler": "cosine",
              "lr_warmup_steps": 1, "eval_split": 0.2}
    straight = TextLoraTrainer(config(models["llama"], data_file, tmp_path / "a", **common)).run()

    def stop_at_4(ev) -> None:
        if ev.kind == "step" and ev.step == 4:
            first.stop()

    first = TextLoraTrainer(config(models["llama"], data_file, tmp_path / "b", **common), [stop_at_4])
    r1 = first.run()
    assert r1.stopped and r1.steps == 4
    assert (tmp_path / "b" / "checkpoints" / "text_lora" / "step-0000004" / "trainer_state.pt").is_file()
    # Another run in the same folder keeps its checkpoints under its own name: its pruning (it keeps
    # one) leaves the stopped run's alone, and its newest is not the stopped run's 'latest'.
    TextLoraTrainer(config(models["llama"], data_file, tmp_path / "b", output_name="other", max_steps=5,
                           save_steps=1, keep_checkpoints=1)).run()
    assert [p.name for p in (tmp_path / "b" / "checkpoints" / "other").iterdir()] == ["step-0000005"]
    with pytest.raises(ConfigError, match="there are checkpoints of other, text_lora"):
        find_checkpoint(tmp_path / "b", "latest", "third")
    r2 = TextLoraTrainer(config(models["llama"], data_file, tmp_path / "b", resume="latest", **common)).run()
    # The resumed run finishes the same run: its adapter replaces the stopped one, which is kept.
    assert r2.steps == 6 and r2.adapter_path == r1.adapter_path and list((tmp_path / "b" / ".backup").iterdir())
    a, b = adapter_tensors(straight.adapter_path), adapter_tensors(r2.adapter_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert r2.final_loss == straight.final_loss and r2.eval_loss == straight.eval_loss
    # ...and it is not trivially equal: the stopped run's adapter differs.
    (stopped,) = (tmp_path / "b" / ".backup").iterdir()
    c = adapter_tensors(stopped)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # Other data or another run length cannot resume from it.
    with pytest.raises(ConfigError, match="belongs to a run of 6 steps"):
        TextLoraTrainer(config(models["llama"], data_file, tmp_path / "b", resume="latest",
                               **{**common, "max_steps": 8})).run()


def test_resume_latest_takes_an_older_release_checkpoint(tmp_path: Path) -> None:
    # Checkpoints written before they were kept per run name: <output_dir>/checkpoints/step-N.
    flat = tmp_path / "checkpoints" / "step-0000003"
    flat.mkdir(parents=True)
    (flat / "trainer_state.pt").write_bytes(b"")
    assert find_checkpoint(tmp_path, "latest", "text_lora") == flat
    named = tmp_path / "checkpoints" / "text_lora" / "step-0000001"
    named.mkdir(parents=True)
    (named / "trainer_state.pt").write_bytes(b"")
    assert find_checkpoint(tmp_path, "latest", "text_lora") == named
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        find_checkpoint(tmp_path, str(tmp_path), "text_lora")


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine", "cosine_with_restarts"])
def test_schedules_warm_up_then_follow_their_shape(kind: str) -> None:
    cfg = build_llm_config({"lr_scheduler": kind, "lr_warmup_steps": 2, "learning_rate": 1.0, "lr_num_cycles": 2})
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, cfg, 10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:3] == [0.0, 0.5, 1.0]
    expected_end = {"constant": 1.0, "linear": 0.125, "cosine": 0.038, "cosine_with_restarts": 0.146}[kind]
    assert lrs[-1] == pytest.approx(expected_end, abs=1e-3)


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    g = epoch_groups(10, 2, 2, seed=5, epoch=1)
    assert g == epoch_groups(10, 2, 2, seed=5, epoch=1) != epoch_groups(10, 2, 2, seed=5, epoch=2)
    assert [len(x) for x in g] == [2, 2, 1] and sorted(i for grp in g for b in grp for i in b) == list(range(10))


def test_merged_model_matches_adapter(models, data_file, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = config(models["gpt2"], data_file, tmp_path, max_steps=2, save_merged=True, tensorboard=True)
    trainer = TextLoraTrainer(cfg)
    result = trainer.run()
    assert result.merged_path == tmp_path / "text_lora-merged"
    if importlib.util.find_spec("tensorboard") is not None:
        assert list((tmp_path / "logs" / "text_lora").glob("events.out.tfevents.*"))
    else:  # as in the A1111 WebUI's venv
        assert ",train/loss," in (tmp_path / "logs" / "text_lora" / "metrics.csv").read_text()
    merged = AutoModelForCausalLM.from_pretrained(str(result.merged_path)).eval()
    batch = fixed_batch(cfg, trainer.tokenizer)
    torch.testing.assert_close(merged(**batch).logits, trainer.model.eval()(**batch).logits, atol=1e-5, rtol=1e-5)


def test_checkpointing_and_bf16_autocast_run(models, data_file, tmp_path: Path) -> None:
    cfg = config(models["llama"], data_file, tmp_path, max_steps=2, gradient_checkpointing=True,
                 mixed_precision="bf16", packing=True, max_length=32)
    trainer = TextLoraTrainer(cfg)
    result = trainer.run()
    assert result.steps == 2 and result.final_loss is not None and torch.isfinite(torch.tensor(result.final_loss))
    base = trainer.model.base_model.model
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing


def test_auto_precision_is_the_devices_and_the_saved_run_names_it(models, data_file, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(models["llama"], data_file, tmp_path, max_steps=1)
    assert cfg.train.mixed_precision == "auto"
    on_gpu = build_llm_config({"model.device": "cuda"}, base=cfg)
    for bf16, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, bf16=bf16, **k: bf16)
        assert with_run_precision(on_gpu).train.mixed_precision == expected
        chosen = build_llm_config({"train.mixed_precision": "no"}, base=on_gpu)
        assert with_run_precision(chosen).train.mixed_precision == "no"
    result = TextLoraTrainer(cfg).run()  # on the CPU auto trains in fp32
    saved = json.loads((result.adapter_path / "lora_trainer.json").read_text())
    assert saved["config"]["train"]["mixed_precision"] == "no"


def test_lora_weights_train_in_fp32_over_half_precision_base_weights(models) -> None:
    cfg = build_llm_config({"base_model": str(models["gpt2"]), "model.dtype": "bf16", "train_file": "x.jsonl"})
    base, _, _ = load_model(cfg.model)
    assert next(base.parameters()).dtype == torch.bfloat16
    peft_model, _ = add_lora(base, cfg.network, seed=1)
    trained = [p for p in peft_model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)


def test_quantized_loading_needs_bitsandbytes(models, data_file, tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here; the missing-package message cannot be shown")
    cfg = config(models["gpt2"], data_file, tmp_path, load_in_4bit=True)
    with pytest.raises(ConfigError, match="bitsandbytes"):
        TextLoraTrainer(cfg).run()


def test_bad_targets_and_missing_model(models, data_file, tmp_path: Path) -> None:
    from lora_trainer.errors import ModelLoadError

    with pytest.raises(ConfigError, match=r"\['qkv'\] not found.*c_attn"):
        TextLoraTrainer(config(models["gpt2"], data_file, tmp_path, target_modules=["qkv"])).run()
    with pytest.raises(ModelLoadError, match="no config.json"):
        TextLoraTrainer(config(tmp_path / "nope", data_file, tmp_path)).run()

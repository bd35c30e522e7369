"""SD3.5 (medium, large) on tiny models built from config: conditioning, training, files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_trainer.families import get_family
from lora_trainer.lora.dit_keys import dit_lora_key
from lora_trainer.models.tiny_dit import T5_MAX_LENGTH, build_bundle
from tests.family_flow_helpers import count_calls, expected_unet_keys, module_keys, train_memorises


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("t5tok")


@pytest.mark.parametrize("variant", ["medium", "large"])
def test_bundle_follows_the_sd3_pipeline(tok_dir: Path, variant: str) -> None:
    b = build_bundle("sd3", variant, tok_dir)
    spec = b.objective_spec
    assert b.arch == "sd3" and b.prediction_type == "flow" and b.latent_channels == 16
    assert spec.kind == "flow" and spec.shift == 3.0 and spec.sampling == "logit_normal" and spec.cfg_sampling
    assert set(b.trainable_roots()) == {"unet", "te1", "te2"}  # T5 is never trained
    assert b.extras["variant"] == variant
    cond = b.encode_text(["a cat", "a dog"])
    # CLIP-L + CLIP-G penultimate states (77 tokens, 32 + 32 wide, zero-padded to T5's 96), then T5's
    assert cond["context"].shape == (2, 77 + T5_MAX_LENGTH, 96)
    assert torch.count_nonzero(cond["context"][:, :77, 64:]) == 0
    assert torch.count_nonzero(cond["context"][:, :77, :64]) > 0 and torch.count_nonzero(cond["context"][:, 77:]) > 0
    assert cond["pooled"].shape == (2, 64)  # pooled L + G projections


def test_timestep_is_sigma_times_1000(tok_dir: Path) -> None:
    b = build_bundle("sd3", "medium", tok_dir)
    seen = []
    b.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    with torch.no_grad():
        b.predict(torch.randn(1, 16, 8, 8), torch.tensor([0.25]), b.encode_text(["a cat"]), None)
    assert float(seen[0]) == pytest.approx(250.0)


@pytest.mark.parametrize("variant", ["medium", "large"])
def test_training_memorises_one_image_caches_text_and_round_trips(tmp_path: Path, tok_dir: Path,
                                                                 variant: str) -> None:
    b = build_bundle("sd3", variant, tok_dir)
    t5_calls = count_calls(b.text_encoders[2].module)
    before, after, result, host = train_memorises(b, tmp_path, {})
    print(f"sd3-{variant}: eval loss before {before:.4f} after {after:.4f}; final training loss {result.final_loss:.4f}")
    assert after < 0.88 * before, (before, after)
    assert "sample" in [e.kind for e in host.events]
    assert t5_calls[0] == 1 + 2  # the cache once (never in the loop or the sample), eval before/after
    assert module_keys(result.lora_path) == expected_unet_keys("sd3", b)


def test_targets_cover_both_streams_and_the_second_attention(tok_dir: Path) -> None:
    b = build_bundle("sd3", "medium", tok_dir)
    keys = expected_unet_keys("sd3", b)
    for path in ("transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.add_q_proj",
                 "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.attn2.to_q",
                 "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff_context.net.2",
                 "transformer_blocks.1.attn.to_out.0"):
        assert dit_lora_key("sd3", "unet", path) in keys, path
    assert not any("norm" in k for k in keys)
    assert get_family("sd3").default_targets("te3", b.text_encoders[2].module, "hf_t5") == []


def test_min_snr_gamma_on_a_flow_model_is_one_line(tmp_path: Path, tok_dir: Path) -> None:
    from lora_trainer.errors import ConfigError
    from lora_trainer.train.trainer import Trainer
    from tests.train_helpers import TinyHost, make_data, tiny_config

    cfg = tiny_config(make_data(tmp_path / "d", n=1), tmp_path / "out", **{"train.min_snr_gamma": 5.0})
    with pytest.raises(ConfigError, match="train.min_snr_gamma") as err:
        Trainer(cfg, host=TinyHost(bundle=build_bundle("sd3", "medium", tok_dir))).run()
    assert "\n" not in str(err.value)

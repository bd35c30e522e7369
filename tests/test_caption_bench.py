"""The captioning benchmark runs and prints its table (the figures themselves are not asserted)."""

from __future__ import annotations

from lora_trainer.bench.caption import blip_config, run_caption_bench


def test_bench_prints_a_row_per_size() -> None:
    printed: list[str] = []
    rows = run_caption_bench(("tiny",), batch_size=2, steps=1, warmup=0, device="cpu", num_beams=2,
                             new_tokens=4, print_fn=printed.append)
    assert len(rows) == 1 and rows[0]["model"] == "blip-tiny" and rows[0]["batch"] == 2
    assert rows[0]["images_per_s"] > 0 and rows[0]["s_per_batch"] > 0
    table = printed[0].splitlines()
    assert "images/s" in table[0] and table[2].startswith("blip-tiny")


def test_base_config_is_blip_base_sized() -> None:
    cfg = blip_config("base")
    assert (cfg.vision_config.hidden_size, cfg.vision_config.num_hidden_layers, cfg.vision_config.image_size) == \
        (768, 12, 384)
    assert cfg.text_config.hidden_size == 768 and cfg.text_config.vocab_size == 30524
    assert blip_config("large").vision_config.hidden_size == 1024

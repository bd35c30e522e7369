"""Tiny BLIP and open_clip models built from config and saved the way users' models are."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "cat", "dog", "red",
         "blue", "on", "the", "sofa", "painting", "with", "green", "small", "big", "house", "tree", "."]

TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_blip(folder: Path, seed: int = 0) -> Path:
    """A ~100k-parameter BLIP captioner with a real BERT tokenizer over a small vocab."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    # transformers 5 ignores BertTokenizer(vocab_file=...); from_pretrained(folder) reads it.
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    ids = {w: i for i, w in enumerate(WORDS)}
    config = BlipConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        text_config={"vocab_size": len(WORDS), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "encoder_hidden_size": 32,
                     "max_position_embeddings": 64, "bos_token_id": ids["[DEC]"],
                     "sep_token_id": ids["[SEP]"], "eos_token_id": ids["[SEP]"], "pad_token_id": ids["[PAD]"]},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny open_clip model in a ``local-dir`` folder: open_clip_config.json + safetensors."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {}}))
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**TINY_CLIP_CFG)  # what the folder's config builds, on any open_clip
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def make_images(folder: Path, n: int = 5) -> list[Path]:
    """Small solid/striped pictures of different sizes and formats."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (240, 240, 20), (20, 20, 20), (200, 120, 255)]
    paths = []
    for i in range(n):
        img = Image.new("RGB", (40 + 8 * i, 48), colours[i % len(colours)])
        for x in range(0, img.width, 6):
            for y in range(img.height):
                img.putpixel((x, y), (255, 255, 255))
        path = folder / (f"img_{i}.png" if i % 2 == 0 else f"img_{i}.jpg")
        img.save(path)
        paths.append(path)
    return paths

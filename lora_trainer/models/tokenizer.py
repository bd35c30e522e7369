"""The real CLIP tokenizer, built offline.

open_clip ships OpenAI's BPE merges (``bpe_simple_vocab_16e6.txt.gz``). From it we write the
``vocab.json``/``merges.txt`` pair a transformers ``CLIPTokenizer`` reads, once, into a cache
folder. The result is token-for-token the tokenizer of SD1/SD2/SDXL (49408 tokens).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from lora_trainer.errors import ModelLoadError
from lora_trainer.fsutil import atomic_write_text

NUM_MERGES = 49152 - 256 - 2  # what OpenAI's CLIP uses of the merges file
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def cache_root() -> Path:
    root = os.environ.get("LORA_TRAINER_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "lora_trainer"


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable unicode map used by CLIP's BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _bpe_file() -> Path:
    try:
        import open_clip
    except ImportError:
        raise ModelLoadError("the CLIP tokenizer needs the package open_clip_torch: pip install open_clip_torch") from None
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the open_clip_torch install; reinstall open_clip_torch")
    return path


def write_clip_tokenizer_files(folder: str | Path, pad_token: str = EOS, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(_bpe_file(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1:NUM_MERGES + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [BOS, EOS]
    atomic_write_text(folder / "vocab.json", json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    atomic_write_text(folder / "special_tokens_map.json", json.dumps(special))
    config = {**special, "model_max_length": model_max_length, "do_lower_case": True,
              "tokenizer_class": "CLIPTokenizer"}
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config))
    return folder


def clip_tokenizer_folder(pad_token: str = EOS) -> Path:
    """A cached folder with CLIP tokenizer files (``pad_token`` "!" is SD2's / SDXL's second)."""
    name = "clip_tokenizer" if pad_token == EOS else "clip_tokenizer_pad_" + ("bang" if pad_token == "!" else "custom")
    folder = cache_root() / name
    if not (folder / "merges.txt").is_file() or not (folder / "tokenizer_config.json").is_file():
        write_clip_tokenizer_files(folder, pad_token=pad_token)
    return folder


def load_clip_tokenizer(pad_token: str = EOS):  # -> transformers.CLIPTokenizer
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_folder(pad_token)))

"""Tiny causal LMs with real tokenizers, built offline: for tests, docs and trying the pipeline.

A byte-level BPE vocabulary is trained in a fraction of a second with the ``tokenizers``
library on a few sentences, then saved the way real model folders store it (GPT-2:
vocab.json/merges.txt; Llama-style: tokenizer.json with a chat template). The models are real
GPT-2 / Llama architectures from config with shrunk widths and seeded random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

EOS = "<|endoftext|>"
# A minimal chat template in the common <|role|> style; ends each turn with EOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}" + EOS + "\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = [
    "Hello! Thanks for reaching out to our support team.",
    "How can I help you today? Our team replies within one business day.",
    "Your order has shipped and will arrive soon. Have a wonderful day!",
    "I am sorry for the trouble. Let me check your account and get back to you.",
    "### User: ### Assistant: ### System: <|user|> <|assistant|> <|system|>",
]


def _train_bpe(vocab_size: int):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def write_tiny_tokenizer(folder: str | Path, family: str = "gpt2", vocab_size: int = 400) -> Path:
    """GPT-2 style (vocab.json + merges.txt, no chat template) or Llama style (tokenizer.json + template)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _train_bpe(vocab_size)
    if family == "gpt2":
        tok.model.save(str(folder))
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": EOS, "eos_token": EOS, "unk_token": EOS}
    else:
        tok.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS,
                  "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def build_tiny_model(folder: str | Path, family: str = "gpt2", seed: int = 0) -> Path:
    """Write a tiny model folder (config, weights, tokenizer) that ``from_pretrained`` loads offline."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    write_tiny_tokenizer(folder, family)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    eos = tokenizer.convert_tokens_to_ids(EOS)
    torch.manual_seed(seed)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2,
                                           n_head=2, bos_token_id=eos, eos_token_id=eos, initializer_range=0.1))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=256, bos_token_id=eos, eos_token_id=eos,
                                             pad_token_id=eos, initializer_range=0.1))
    else:
        raise ValueError(f"unknown tiny family {family!r}; use 'gpt2' or 'llama'")
    model.save_pretrained(str(folder))
    return folder

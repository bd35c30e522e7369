"""Text-LoRA config and data: keys and aliases, file errors, chat formatting, loss masks, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.llm.config import LLMDataConfig, build_llm_config, load_llm_config
from lora_trainer.llm.data import IGNORE, build_datasets, format_prompt, read_records, split_indices
from lora_trainer.llm.model import load_tokenizer
from lora_trainer.llm.tiny import EOS, write_tiny_tokenizer


@pytest.fixture(scope="module")
def gpt2_tok(tmp_path_factory: pytest.TempPathFactory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("gpt2tok"), "gpt2"))


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory: pytest.TempPathFactory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("chattok"), "llama"))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def data_cfg(path: Path, **kw) -> LLMDataConfig:
    return LLMDataConfig(train_file=str(path), **kw)


# -- config --------------------------------------------------------------------------------------

def test_yaml_flat_keys_and_sections(tmp_path: Path) -> None:
    y = tmp_path / "llm.yaml"
    y.write_text("task: llm\nbase_model: /models/tiny\ntrain_data: chats.jsonl\nlora_rank: 4\nlora_alpha: 8\n"
                 "learning_rate: 1e-3\nepochs: 2\nbatch_size: 3\nmax_length: 64\noutput_dir: out\n"
                 "train:\n  gradient_accumulation_steps: 2\n", encoding="utf-8")
    cfg = load_llm_config(y, ["network.dropout=0.1", "packing=true"])
    assert (cfg.model.base_model, cfg.data.train_file) == ("/models/tiny", "chats.jsonl")
    assert (cfg.network.rank, cfg.network.alpha, cfg.network.dropout) == (4, 8.0, 0.1)
    assert (cfg.optim.learning_rate, cfg.train.epochs, cfg.train.batch_size) == (1e-3, 2, 3)
    assert (cfg.data.max_length, cfg.data.packing, cfg.train.gradient_accumulation_steps) == (64, True, 2)
    assert cfg.output.output_dir == "out"


def test_unknown_key_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'lora_rank'"):
        build_llm_config({"lora_rnak": 4})
    with pytest.raises(ConfigError, match="unknown key 'epoch' in section 'train'.*did you mean 'epochs'"):
        load_llm_config(None, ["train.epoch=3"])


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ConfigError, match="network.rank"):
        build_llm_config({"lora_rank": 0})
    with pytest.raises(ConfigError, match="data.eval_split"):
        build_llm_config({"eval_split": 1.5})
    with pytest.raises(ConfigError, match="train.batch_size.*'many' is not valid"):
        build_llm_config({"batch_size": "many"})
    with pytest.raises(ConfigError, match="load_in_4bit and load_in_8bit"):
        build_llm_config({"load_in_4bit": True, "load_in_8bit": True})


def test_image_task_refused(tmp_path: Path) -> None:
    y = tmp_path / "img.yaml"
    y.write_text("task: image\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="needs 'task: llm'"):
        load_llm_config(y)


# -- reading files -------------------------------------------------------------------------------

def test_malformed_jsonl_lines_reported_by_number(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, '{"prompt": "x", "response": ',
                                            {"prompt": "a", "response": "b"}, "", {"question": "q"}, "[1, 2]"])
    with pytest.raises(DatasetError) as e:
        read_records(f, data_cfg(f))
    msg = str(e.value)
    assert "3 malformed lines" in msg and "line 2: invalid JSON" in msg and "line 5: no 'prompt'" in msg
    assert "line 6: not a JSON object" in msg and str(f) in msg
    f2 = write_jsonl(tmp_path / "d2.jsonl", [{"prompt": "a", "response": "b"}, "", {"question": "q"}, "[1, 2]",
                                             {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DatasetError) as e:
        read_records(f2, data_cfg(f2))
    msg = str(e.value)
    assert "3 malformed lines" in msg and "line 3: no 'prompt'" in msg and "line 4: not a JSON object" in msg
    assert "line 5: the chat has no 'assistant'" in msg and "\n" not in msg


def test_empty_data(tmp_path: Path) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="no training records"):
        read_records(f, data_cfg(f))
    with pytest.raises(DatasetError, match="is not a file"):
        read_records(tmp_path / "missing.jsonl", data_cfg(tmp_path / "missing.jsonl"))


def test_csv_records(tmp_path: Path) -> None:
    f = tmp_path / "d.csv"
    f.write_text('prompt,response\n"Hi, there","Hello! How can I help?"\n', encoding="utf-8")
    recs = read_records(f, data_cfg(f, system_prompt="Be kind."))
    assert recs == [{"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi, there"},
                                  {"role": "assistant", "content": "Hello! How can I help?"}]}]
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nq,a\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="none of the columns"):
        read_records(bad, data_cfg(bad))


# -- formatting and masks ------------------------------------------------------------------------

def _decoded_targets(tok, sample) -> str:
    return tok.decode([t for t, lab in zip(sample.input_ids, sample.labels, strict=True) if lab != IGNORE])


def test_response_only_mask_plain_format(tmp_path: Path, gpt2_tok) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Where is my order?", "response": "Your order has shipped."}])
    train, _, report = build_datasets(data_cfg(f), gpt2_tok, seed=0)
    (s,) = train
    assert report.template == "plain"
    assert gpt2_tok.decode(s.input_ids) == "### User:\nWhere is my order?\n\n### Assistant:\nYour order has shipped." + EOS
    # Exactly the reply and EOS carry loss; every prompt token (and the header) is -100.
    assert _decoded_targets(gpt2_tok, s) == "Your order has shipped." + EOS
    n_prompt = len(gpt2_tok("### User:\nWhere is my order?\n\n### Assistant:\n")["input_ids"])
    assert s.labels[:n_prompt] == [IGNORE] * n_prompt and IGNORE not in s.labels[n_prompt:]
    full, _, _ = build_datasets(data_cfg(f, response_only_loss=False), gpt2_tok, seed=0)
    assert full[0].labels == full[0].input_ids


def test_response_only_mask_chat_template_multi_turn(tmp_path: Path, chat_tok) -> None:
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Order?"},
                         {"role": "assistant", "content": "It shipped."}]}
    f = write_jsonl(tmp_path / "d.jsonl", [chat])
    train, _, report = build_datasets(data_cfg(f), chat_tok, seed=0)
    (s,) = train
    assert report.template == "chat template"
    assert chat_tok.decode(s.input_ids) == chat_tok.apply_chat_template(chat["messages"], tokenize=False)
    # Both replies with their end-of-turn token are learned; roles, system and user text are not.
    assert _decoded_targets(chat_tok, s) == f"Hello!{EOS}\nIt shipped.{EOS}\n"
    assert format_prompt(chat_tok, "Hi", system="Be brief.") == chat_tok.apply_chat_template(
        chat["messages"][:2], tokenize=False, add_generation_prompt=True)


def test_text_records_learn_everything(tmp_path: Path, chat_tok) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "Thanks for reaching out!"}])
    (s,), _, _ = build_datasets(data_cfg(f), chat_tok, seed=0)
    assert s.labels == s.input_ids and chat_tok.decode(s.input_ids) == "Thanks for reaching out!" + EOS


def test_truncation_counted_and_prompt_only_samples_dropped(tmp_path: Path, gpt2_tok) -> None:
    long = "Thanks for reaching out! " * 20
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "response": long}, {"prompt": "Hi", "response": "Hello!"},
                                           {"prompt": long, "response": "ok"}])
    train, _, report = build_datasets(data_cfg(f, max_length=24), gpt2_tok, seed=0)
    assert report.truncated == 2 and report.dropped_no_target == 1 and len(train) == 2
    assert all(len(s.input_ids) <= 24 for s in train)
    assert "2 samples longer than max_length were truncated" in report.summary()


def test_packing_keeps_every_token_and_mask(tmp_path: Path, gpt2_tok) -> None:
    rows = [{"prompt": f"Question {i}?", "response": "Your order has shipped."} for i in range(6)]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    plain, _, _ = build_datasets(data_cfg(f), gpt2_tok, seed=0)
    packed, _, report = build_datasets(data_cfg(f, packing=True, max_length=16), gpt2_tok, seed=0)
    ids = [t for s in plain for t in s.input_ids]
    labels = [t for s in plain for t in s.labels]
    blocks = [(ids[i:i + 16], labels[i:i + 16]) for i in range(0, len(ids), 16)]
    # The stream is cut every 16 tokens; blocks with no reply token (no loss) are left out.
    assert [(s.input_ids, s.labels) for s in packed] == [b for b in blocks if any(t != IGNORE for t in b[1])]
    assert 0 < len(packed) < len(blocks) and report.packed_blocks == len(packed)


def test_eval_split_is_seeded_and_disjoint() -> None:
    a, b = split_indices(20, 0.25, seed=3)
    assert (len(a), len(b)) == (15, 5) and not set(a) & set(b) and sorted(a + b) == list(range(20))
    assert split_indices(20, 0.25, seed=3) == (a, b) and split_indices(20, 0.25, seed=4) != (a, b)
    with pytest.raises(DatasetError, match="leaves nothing to train on"):
        split_indices(1, 0.5, seed=0)


def test_is_llm_config_routes_by_task(tmp_path: Path) -> None:
    from lora_trainer.llm.config import is_llm_config

    (tmp_path / "a.yaml").write_text("task: llm\nbase_model: m\n", encoding="utf-8")
    (tmp_path / "b.yaml").write_text("base_model: demo\n", encoding="utf-8")
    assert is_llm_config(tmp_path / "a.yaml") and not is_llm_config(tmp_path / "b.yaml")
    # An 'llm:' section holds the same keys as the top level.
    (tmp_path / "c.yaml").write_text("task: llm\nllm:\n  base_model: m\n  lora_rank: 4\n", encoding="utf-8")
    cfg = load_llm_config(tmp_path / "c.yaml")
    assert (cfg.model.base_model, cfg.network.rank) == ("m", 4)


def test_template_that_rewrites_earlier_turns_still_masks_replies(tmp_path: Path, chat_tok) -> None:
    import copy

    tok = copy.deepcopy(chat_tok)
    # This template closes a finished chat with a marker, so a prefix render is not a prefix of the next.
    tok.chat_template = chat_tok.chat_template + "{% if not add_generation_prompt %}<|end|>{% endif %}"
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "Order?"}, {"role": "assistant", "content": "It shipped."}]}
    f = write_jsonl(tmp_path / "d.jsonl", [chat])
    (s,), _, _ = build_datasets(data_cfg(f), tok, seed=0)
    assert tok.decode(s.input_ids) == tok.apply_chat_template(chat["messages"], tokenize=False)
    assert _decoded_targets(tok, s) == "Hello!It shipped."


def test_failing_chat_template_names_the_record(tmp_path: Path, chat_tok) -> None:
    import copy

    tok = copy.deepcopy(chat_tok)
    tok.chat_template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('needs a system turn') }}{% endif %}"
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "response": "Hello"}])
    with pytest.raises(DatasetError, match="record 1: the tokenizer's chat template failed.*needs a system turn"):
        build_datasets(data_cfg(f), tok, seed=0)

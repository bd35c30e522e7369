"""Text-LoRA data: read JSONL/CSV, format with the chat template, tokenize, mask, pack, split.

Three record shapes are accepted (field names configurable in ``data``):
``{"prompt": ..., "response": ...}``, ``{"messages": [{"role", "content"}, ...]}`` and
``{"text": ...}``. Every record becomes a list of text segments, each marked trainable or not;
segments are tokenized one by one so the loss mask follows them exactly (labels are -100 on
prompt, system and template tokens when ``response_only_loss`` is on).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_trainer.errors import DatasetError
from lora_trainer.llm.config import LLMDataConfig

IGNORE = -100  # label value the loss skips (transformers' convention)
PLAIN_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
ROLES = ("system", "user", "assistant")


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


@dataclass
class DataReport:
    file: str
    records: int = 0
    train: int = 0
    eval: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    template: str = "plain"
    packed_blocks: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.file}: {self.records} records ({self.train} train, {self.eval} eval), "
                 f"{self.tokens} tokens, format: {self.template}"]
        if self.truncated:
            parts.append(f"{self.truncated} samples longer than max_length were truncated")
        if self.dropped_no_target:
            parts.append(f"{self.dropped_no_target} samples had no response tokens left and were skipped")
        if self.packed_blocks:
            parts.append(f"packed into {self.packed_blocks} blocks")
        return "; ".join(parts + self.notes)


# -- reading files ---------------------------------------------------------------------------

def _normalize(obj: Any, cfg: LLMDataConfig) -> dict[str, Any] | str:
    """A record as {"messages": [...]} or {"text": str}; a string says what is wrong with it."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    if cfg.messages_field in obj:
        msgs = obj[cfg.messages_field]
        if not isinstance(msgs, list) or not msgs:
            return f"'{cfg.messages_field}' must be a non-empty list"
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return f"message {i + 1} needs 'role' (system/user/assistant) and text 'content'"
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            return "the chat has no 'assistant' message to learn"
        return {"messages": out}
    if cfg.prompt_field in obj or cfg.response_field in obj:
        p, r = obj.get(cfg.prompt_field), obj.get(cfg.response_field)
        if not isinstance(p, str) or not isinstance(r, str) or not r.strip():
            return f"needs text '{cfg.prompt_field}' and non-empty '{cfg.response_field}'"
        msgs = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        return {"messages": msgs + [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
    if cfg.text_field in obj:
        t = obj[cfg.text_field]
        if not isinstance(t, str) or not t.strip():
            return f"'{cfg.text_field}' must be non-empty text"
        return {"text": t}
    return (f"no '{cfg.prompt_field}'/'{cfg.response_field}', '{cfg.messages_field}' "
            f"or '{cfg.text_field}' field")


def _raise_bad(path: Path, bad: list[tuple[int, str]], what: str) -> None:
    shown = "; ".join(f"{what} {n}: {msg}" for n, msg in bad[:5])
    more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
    raise DatasetError(f"{path}: {len(bad)} malformed {what}s: {shown}{more}; fix or remove them")


def _iter_raw(path: Path, fmt: str, cfg: LLMDataConfig) -> tuple[list[tuple[int, Any]], list[tuple[int, str]], str]:
    """(number, parsed object) pairs, (number, problem) pairs, and the word for a number ('line' or 'row')."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    if fmt == "csv":
        reader = csv.DictReader(text.splitlines())
        cols = reader.fieldnames or []
        known = {cfg.prompt_field, cfg.response_field, cfg.text_field}
        if not known & set(cols):
            raise DatasetError(f"{path}: CSV header {cols} has none of the columns "
                               f"'{cfg.prompt_field}','{cfg.response_field}' or '{cfg.text_field}'")
        rows = [(i + 2, {k: v for k, v in row.items() if k in known and v is not None})
                for i, row in enumerate(reader)]
        return rows, [], "row"
    out: list[tuple[int, Any]] = []
    bad: list[tuple[int, str]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            bad.append((n, f"invalid JSON ({e.msg} at column {e.colno})"))
    return out, bad, "line"


def read_records(path: str | Path, cfg: LLMDataConfig) -> list[dict[str, Any]]:
    """Read and check every record; malformed lines are reported together by line number."""
    path = Path(path)
    if not str(path).strip() or not path.is_file():
        raise DatasetError(f"data.train_file: '{path}' is not a file; give a .jsonl or .csv file")
    fmt = cfg.format
    if fmt == "auto":
        fmt = "csv" if path.suffix.lower() == ".csv" else "jsonl"
    raw, bad, what = _iter_raw(path, fmt, cfg)
    records = []
    for n, obj in raw:
        rec = _normalize(obj, cfg)
        if isinstance(rec, str):
            bad.append((n, rec))
        else:
            records.append(rec)
    if bad:
        _raise_bad(path, sorted(bad), what)
    if not records:
        raise DatasetError(f"{path}: no training records found; add lines like "
                           '{"prompt": "...", "response": "..."}')
    return records


# -- formatting and tokenizing ---------------------------------------------------------------

def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: Any, msgs: list[dict[str, str]], gen: bool) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def _template_segments(tokenizer: Any, msgs: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """Segments of the chat-template text; each assistant turn (with its end-of-turn) is trainable.

    Renders growing prefixes of the chat, so template tokens around a reply land on the right
    side of the mask. Templates whose prefixes are not prefixes of the full text (some rewrite
    earlier turns) fall back to marking just the reply texts found in the full render.
    """
    segs: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head, full = _render(tokenizer, msgs[:i], True) if i else "", _render(tokenizer, msgs[: i + 1], False)
        if not head.startswith(done) or not full.startswith(head):
            return _fallback_segments(tokenizer, msgs)
        segs += [(head[len(done):], False), (full[len(head):], True)]
        done = full
    tail = _render(tokenizer, msgs, False)
    if not tail.startswith(done):
        return _fallback_segments(tokenizer, msgs)
    segs.append((tail[len(done):], False))
    return [s for s in segs if s[0]]


def _fallback_segments(tokenizer: Any, msgs: list[dict[str, str]]) -> list[tuple[str, bool]]:
    text, segs, cursor = _render(tokenizer, msgs, False), [], 0
    for m in msgs:
        if m["role"] != "assistant":
            continue
        at = text.find(m["content"], cursor)
        if at < 0:
            continue
        segs += [(text[cursor:at], False), (m["content"], True)]
        cursor = at + len(m["content"])
    segs.append((text[cursor:], False))
    return [s for s in segs if s[0]]


def plain_segments(msgs: list[dict[str, str]], eos: str) -> list[tuple[str, bool]]:
    """'### User:' / '### Assistant:' format for tokenizers without a chat template."""
    segs: list[tuple[str, bool]] = []
    for i, m in enumerate(msgs):
        sep = "\n\n" if i else ""
        if m["role"] == "assistant":
            segs += [(sep + PLAIN_HEADERS["assistant"], False), (m["content"] + eos, True)]
        else:
            segs.append((sep + PLAIN_HEADERS[m["role"]] + m["content"], False))
    return segs


def format_prompt(tokenizer: Any, prompt: str, use_chat_template: bool = True, system: str = "") -> str:
    """The text a model sees before its reply (used by generate, and equal to training's prefix)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if use_chat_template and has_chat_template(tokenizer):
        return _render(tokenizer, msgs, True)
    return "".join(t for t, _ in plain_segments(msgs, "")) + "\n\n" + PLAIN_HEADERS["assistant"]


def record_segments(rec: dict[str, Any], tokenizer: Any, cfg: LLMDataConfig) -> tuple[list[tuple[str, bool]], bool]:
    """(segments, uses_template) for one normalized record."""
    eos = tokenizer.eos_token or ""
    if "text" in rec:
        return [(rec["text"] + eos, True)], False
    if cfg.use_chat_template and has_chat_template(tokenizer):
        return _template_segments(tokenizer, rec["messages"]), True
    return plain_segments(rec["messages"], eos), False


def encode_segments(segs: list[tuple[str, bool]], tokenizer: Any, templated: bool,
                    response_only: bool) -> Sample:
    ids: list[int] = []
    labels: list[int] = []
    for i, (text, trainable) in enumerate(segs):
        # Chat templates write their own BOS; plain text gets the tokenizer's (Llama adds one).
        part = tokenizer(text, add_special_tokens=(i == 0 and not templated))["input_ids"]
        ids += part
        labels += part if (trainable or not response_only) else [IGNORE] * len(part)
    return Sample(ids, labels)


def pack(samples: list[Sample], block: int) -> list[Sample]:
    """Concatenate samples and cut the stream into ``block``-token pieces (last one shorter)."""
    ids = [t for s in samples for t in s.input_ids]
    labels = [t for s in samples for t in s.labels]
    out = [Sample(ids[i:i + block], labels[i:i + block]) for i in range(0, len(ids), block)]
    return [s for s in out if any(t != IGNORE for t in s.labels)]


def split_indices(n: int, eval_split: float, seed: int) -> tuple[list[int], list[int]]:
    idx = list(range(n))
    if eval_split <= 0:
        return idx, []
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(n * eval_split))
    if n_eval >= n:
        raise DatasetError(f"data.eval_split: {eval_split} of {n} records leaves nothing to train on; "
                           "lower it or add data")
    return sorted(idx[n_eval:]), sorted(idx[:n_eval])


def build_datasets(cfg: LLMDataConfig, tokenizer: Any, seed: int) -> tuple[list[Sample], list[Sample], DataReport]:
    """Read, format, tokenize, truncate (or pack) and split ``cfg.train_file``."""
    records = read_records(cfg.train_file, cfg)
    report = DataReport(file=cfg.train_file, records=len(records))
    samples: list[Sample | None] = []
    for n, rec in enumerate(records, start=1):
        try:
            segs, templated = record_segments(rec, tokenizer, cfg)
        except Exception as e:  # noqa: BLE001 - chat templates raise their own jinja errors
            raise DatasetError(f"{cfg.train_file}: record {n}: the tokenizer's chat template failed ({e}); "
                               "fix the chat or set data.use_chat_template: false") from None
        if templated:
            report.template = "chat template"
        s = encode_segments(segs, tokenizer, templated, cfg.response_only_loss)
        if not cfg.packing and len(s.input_ids) > cfg.max_length:
            report.truncated += 1
            s = Sample(s.input_ids[:cfg.max_length], s.labels[:cfg.max_length])
        if all(t == IGNORE for t in s.labels):
            report.dropped_no_target += 1
            samples.append(None)
            continue
        samples.append(s)
    tr_idx, ev_idx = split_indices(len(samples), cfg.eval_split, seed)
    train = [samples[i] for i in tr_idx if samples[i] is not None]
    evals = [samples[i] for i in ev_idx if samples[i] is not None]
    if not train:
        raise DatasetError(f"{cfg.train_file}: no sample has response tokens within data.max_length "
                           f"({cfg.max_length}); raise max_length or shorten the prompts")
    report.tokens = sum(len(s.input_ids) for s in train + evals)
    if cfg.packing:
        train, evals = pack(train, cfg.max_length), pack(evals, cfg.max_length)
        report.packed_blocks = len(train)
    report.train, report.eval = len(train), len(evals)
    return train, evals, report


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding gets attention 0 and label -100."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}

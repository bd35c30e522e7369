"""Caption processing applied each time an image is drawn: trigger word, tag shuffle, dropout."""

from __future__ import annotations

import random
import re


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [t.strip() for t in caption.split(",") if t.strip()]


def has_trigger(caption: str, trigger_word: str) -> bool:
    """True when ``trigger_word`` already appears in ``caption`` as whole words (case-insensitive)."""
    trigger = trigger_word.strip()
    if not trigger:
        return True
    # \b would fail next to non-word characters (e.g. a trigger ending in ')'); look-arounds don't.
    pattern = r"(?<!\w)" + re.escape(trigger) + r"(?!\w)"
    return re.search(pattern, caption, flags=re.IGNORECASE) is not None


def process_caption(caption: str, trigger_word: str = "", shuffle: bool = False, keep_tokens: int = 0,
                    dropout: float = 0.0, rng: random.Random | None = None, tag_dropout: float = 0.0) -> str:
    """The caption one training step sees.

    - dropout: with probability ``dropout`` the caption is "" (trains the unconditional case).
    - trigger_word: put first, as its own tag, unless the caption already contains it.
    - shuffle: shuffle the comma-separated tags, keeping the first ``keep_tokens`` in place (the
      trigger word, when added, is the first tag and counts as one).
    - tag_dropout: then leave out each of those other tags with this probability (kohya's
      caption_tag_dropout_rate).
    Deterministic for a given ``rng`` state; the caption text is unchanged when nothing applies.
    """
    rng = rng or random.Random()
    if dropout > 0.0 and rng.random() < dropout:
        return ""
    text = caption.strip()
    trigger = trigger_word.strip()
    add_trigger = bool(trigger) and not has_trigger(text, trigger)
    if not shuffle and not tag_dropout:
        if add_trigger:
            return f"{trigger}, {text}" if text else trigger
        return text
    tags = split_tags(text)
    if add_trigger:
        tags.insert(0, trigger)
    keep = max(0, keep_tokens)
    head, tail = tags[:keep], tags[keep:]
    if shuffle:
        rng.shuffle(tail)
    if tag_dropout:
        tail = [tag for tag in tail if rng.random() >= tag_dropout]
    return ", ".join(head + tail)

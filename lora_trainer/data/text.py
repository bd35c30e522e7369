"""Caption processing applied each time an image is drawn: kohya's wildcards, prefix/suffix, trigger
word, tag shuffle (kohya's keep_tokens and separators), dropout."""

from __future__ import annotations

import random
import re
from typing import Any


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


# DataConfig fields that are keyword arguments of process_caption, under the same names.
CAPTION_OPTIONS = ("caption_prefix", "caption_suffix", "keep_tokens_separator", "secondary_separator",
                   "enable_wildcard")


def caption_options(data_cfg: Any) -> dict[str, Any]:
    """The :data:`CAPTION_OPTIONS` of a DataConfig, as keyword arguments of :func:`process_caption`
    (every caller that shows or trains a caption passes the same ones)."""
    out: dict[str, Any] = {name: getattr(data_cfg, name, "") or "" for name in CAPTION_OPTIONS}
    out["enable_wildcard"] = bool(getattr(data_cfg, "enable_wildcard", False))
    return out


# A wildcard choice: braces holding no other braces; its options are split at '|'.
_CHOICE = re.compile(r"\{([^{}]*)\}")


def _lines(caption: str) -> list[str]:
    """The non-blank lines of a caption, stripped (a blank one is never a caption to draw)."""
    return [line.strip() for line in caption.split("\n") if line.strip()]


def expand_wildcards(caption: str, rng: random.Random | None = None) -> str:
    """kohya's enable_wildcard: one line of a multi-line caption, and one option of each
    ``{a|b|c}``, drawn from ``rng``; without ``rng`` the first line and first options (a
    readable preview that draws nothing).

    Choices are expanded innermost first, so ``{a|{b|c}}`` nests; braces that do not pair up on
    one line stay as written, and ``{a}`` (one option) becomes ``a`` as in kohya. Only a real
    choice (two or more lines or options) draws from ``rng``, so a caption without choices
    gives the same draws as with the option off.
    """
    def pick(options: list[str]) -> str:
        return options[0] if rng is None or len(options) == 1 else rng.choice(options)

    text = pick(_lines(caption) or [""])
    count = 1
    while count:
        text, count = _CHOICE.subn(lambda m: pick(m.group(1).split("|")), text)
    return text


def wildcard_expansions(caption: str, limit: int) -> list[str] | None:
    """Every text :func:`expand_wildcards` can make of ``caption`` (sorted, distinct), or None
    when there are more than ``limit`` ways to expand it (the text cache would grow too big)."""
    todo, found, ways = _lines(caption) or [""], set[str](), 0
    while todo:
        text = todo.pop()
        m = _CHOICE.search(text)
        if m is None:
            found.add(text)
            ways += 1
            if ways > limit:
                return None
            continue
        todo += [text[:m.start()] + option + text[m.end():] for option in m.group(1).split("|")]
    return sorted(found)


def add_affixes(text: str, prefix: str = "", suffix: str = "") -> str:
    """kohya's caption_prefix / caption_suffix: joined to the caption with one space (none before
    a suffix that starts with a comma, as in ", from side"); an empty caption becomes the two
    joined with ", "."""
    prefix, suffix = prefix.strip(), suffix.strip()
    if not text:
        return ", ".join(p for p in (prefix.rstrip(", "), suffix.lstrip(", ")) if p)
    if prefix:
        text = f"{prefix} {text}"
    if suffix:
        text = f"{text}{'' if suffix.startswith(',') else ' '}{suffix}"
    return text


def _parts(text: str, trigger: str, keep_tokens: int, separator: str) -> tuple[list[str], list[str], list[str]]:
    """(head, middle, tail) tags: only the middle is shuffled and dropped.

    With ``separator`` in the text (kohya's keep_tokens_separator) the tags before it are the head
    and those after a second one the tail (any later one reads as a comma); else the head is the
    first ``keep_tokens`` tags. The trigger word, when given, is the head's first tag.
    """
    if separator and separator in text:
        head_text, _, rest = text.partition(separator)
        middle_text, _, tail_text = rest.partition(separator)
        head, middle = split_tags(head_text), split_tags(middle_text)
        tail = split_tags(tail_text.replace(separator, ","))
        return ([trigger] if trigger else []) + head, middle, tail
    tags = split_tags(text)
    if trigger:
        tags.insert(0, trigger)
    keep = max(0, keep_tokens)
    return tags[:keep], tags[keep:], []


def _expand(tags: list[str], secondary_separator: str) -> list[str]:
    """Tags joined with kohya's secondary_separator, written out as separate tags for the encoder."""
    if not secondary_separator:
        return tags
    return [part.strip() for tag in tags for part in tag.split(secondary_separator) if part.strip()]


def process_caption(caption: str, trigger_word: str = "", shuffle: bool = False, keep_tokens: int = 0,
                    dropout: float = 0.0, rng: random.Random | None = None, tag_dropout: float = 0.0, *,
                    caption_prefix: str = "", caption_suffix: str = "", keep_tokens_separator: str = "",
                    secondary_separator: str = "", enable_wildcard: bool = False) -> str:
    """The caption one training step sees.

    - dropout: with probability ``dropout`` the caption is "" (trains the unconditional case).
    - enable_wildcard: then one line of a multi-line caption and one option of each ``{a|b}``
      (:func:`expand_wildcards`), first, so everything below sees the chosen text. Off, a
      caption's lines and braces are kept as written.
    - caption_prefix / caption_suffix: joined to every other caption first (:func:`add_affixes`),
      so the trigger word check, shuffle, keep_tokens and tag dropout see them.
    - trigger_word: put first, as its own tag, unless the caption already contains it.
    - shuffle: shuffle the comma-separated tags, keeping the first ``keep_tokens`` in place (the
      trigger word, when added, is the first tag and counts as one).
    - tag_dropout: then leave out each of those other tags with this probability (kohya's
      caption_tag_dropout_rate).
    - keep_tokens_separator: in a caption that contains it, the tags before it (instead of the
      first keep_tokens) and those after a second one stay in place (:func:`_parts`).
    - secondary_separator: tags joined with it are one tag for shuffle, keep_tokens and tag
      dropout; the encoder sees them comma-separated.
    A caption containing either separator is always written as its tags joined with ", ", shuffled
    or not, so a separator never reaches the text encoder. Deterministic for a given ``rng``
    state; the caption text is unchanged when nothing applies, and with none of the keyword
    options set the output and the draws from ``rng`` are exactly those of earlier versions.
    """
    rng = rng or random.Random()
    if dropout > 0.0 and rng.random() < dropout:
        return ""
    if enable_wildcard:
        caption = expand_wildcards(caption, rng)
    text = add_affixes(caption.strip(), caption_prefix, caption_suffix)
    trigger = trigger_word.strip()
    add_trigger = bool(trigger) and not has_trigger(text, trigger)
    separated = any(sep and sep in text for sep in (keep_tokens_separator, secondary_separator))
    if not shuffle and not tag_dropout and not separated:
        if add_trigger:
            return f"{trigger}, {text}" if text else trigger
        return text
    head, tail, fixed_end = _parts(text, trigger if add_trigger else "", keep_tokens, keep_tokens_separator)
    if shuffle:
        rng.shuffle(tail)
    if tag_dropout:
        tail = [tag for tag in tail if rng.random() >= tag_dropout]
    return ", ".join(_expand(head + tail + fixed_end, secondary_separator))

"""Tag tools: pure functions on ``{file: caption}``.

A caption is read as comma-separated tags (``"sks, a cat, sofa"`` → ``["sks", "a cat", "sofa"]``);
a sentence without commas is one tag. Every function returns a new dict and leaves its input
alone, so the CLI and the tab can show a preview and write only what changed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

from lora_trainer.errors import ConfigError

Captions = dict[str, str]
SEPARATOR = ", "


def split_tags(caption: str) -> list[str]:
    """Tags of one caption, whitespace-trimmed, empty ones dropped."""
    return [t.strip() for t in caption.split(",") if t.strip()]


def join_tags(tags: list[str]) -> str:
    return SEPARATOR.join(t for t in tags if t)


def _map_tags(captions: Captions, fn: Callable[[list[str]], list[str]]) -> Captions:
    out: Captions = {}
    for name, caption in captions.items():
        tags = split_tags(caption)
        new = fn(tags)
        # Untouched captions keep their exact text (spacing, trailing comma): no spurious edits.
        out[name] = caption if new == tags else join_tags(new)
    return out


def tag_frequency(captions: Captions) -> list[tuple[str, int]]:
    """(tag, number of captions that hold it), most frequent first, then alphabetical."""
    counts: Counter[str] = Counter()
    for caption in captions.values():
        counts.update(set(split_tags(caption)))
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def format_frequency(freq: list[tuple[str, int]], total: int, limit: int | None = None) -> str:
    """A plain-text table of :func:`tag_frequency` for the terminal."""
    rows = freq[:limit] if limit else freq
    if not rows:
        return "(no tags)"
    width = max(len(t) for t, _ in rows)
    lines = [f"{'tag'.ljust(width)}  count  share"]
    for tag, n in rows:
        share = 100.0 * n / total if total else 0.0
        lines.append(f"{tag.ljust(width)}  {n:5d}  {share:4.0f}%")
    return "\n".join(lines)


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"--replace pattern {pattern!r} is not a valid regular expression ({e})") from None


def find_replace(captions: Captions, find: str, replace: str, *, regex: bool = False,
                 whole_tag: bool = True) -> Captions:
    """Replace ``find`` with ``replace``.

    ``whole_tag`` (default) matches whole tags only, so replacing ``cat`` leaves ``catgirl``
    alone; otherwise it works on the caption text like an editor's find/replace. With ``regex``
    the pattern is a Python regular expression (``re.fullmatch`` per tag when ``whole_tag``) and
    ``replace`` may use ``\\1`` groups. A tag replaced by an empty string disappears.
    """
    if not find:
        raise ConfigError("find/replace: the text to find is empty")
    pattern = _compile(find) if regex else None
    if not whole_tag:
        if pattern is not None:
            return {k: pattern.sub(replace, v) for k, v in captions.items()}
        return {k: v.replace(find, replace) for k, v in captions.items()}

    def one(tag: str) -> str:
        if pattern is not None:
            return pattern.sub(replace, tag) if pattern.fullmatch(tag) else tag
        return replace.strip() if tag == find.strip() else tag

    return _map_tags(captions, lambda tags: [one(t).strip() for t in tags])


def remove_tag(captions: Captions, tag: str) -> Captions:
    """Drop ``tag`` (whole-tag, exact match) from every caption."""
    tag = tag.strip()
    return _map_tags(captions, lambda tags: [t for t in tags if t != tag])


def add_trigger(captions: Captions, trigger: str) -> Captions:
    """Put ``trigger`` first in every caption, removing any other copy of it."""
    return {name: add_trigger_to(caption, trigger) for name, caption in captions.items()}


def add_trigger_to(caption: str, trigger: str) -> str:
    trigger = trigger.strip().strip(",").strip()
    if not trigger:
        return caption
    tags = split_tags(caption)
    new = [trigger] + [t for t in tags if t != trigger]
    return caption if new == tags else join_tags(new)


def dedupe_tags(captions: Captions) -> Captions:
    """Keep the first copy of each tag in each caption, in order."""
    return _map_tags(captions, lambda tags: list(dict.fromkeys(tags)))


def sort_tags(captions: Captions, keep_first: int = 0) -> Captions:
    """Sort each caption's tags alphabetically (case-insensitive); the first ``keep_first``
    tags (a trigger word, say) stay where they are."""
    if keep_first < 0:
        raise ConfigError(f"sort: keep_first must be 0 or more, got {keep_first}")
    return _map_tags(captions, lambda tags: tags[:keep_first] + sorted(tags[keep_first:], key=str.casefold))


def changed(before: Captions, after: Captions) -> list[str]:
    """Names whose caption differs (for previews and 'N captions changed' messages)."""
    return sorted(k for k in after if before.get(k) != after[k])

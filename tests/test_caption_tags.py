"""Tag tools: pure functions on {file: caption}."""

from __future__ import annotations

import pytest

from lora_trainer.caption import tags as t
from lora_trainer.errors import ConfigError

CAPS = {
    "a.png": "cat, sofa, red, cat",
    "b.png": "sks, catgirl, red",
    "c.png": "a dog on a sofa",
}


def test_split_and_join_tags() -> None:
    assert t.split_tags(" cat ,  sofa,, red ,") == ["cat", "sofa", "red"]
    assert t.join_tags(["cat", "", "sofa"]) == "cat, sofa"


def test_frequency_counts_each_caption_once_and_sorts() -> None:
    freq = t.tag_frequency(CAPS)
    assert freq[0] == ("red", 2)
    assert dict(freq)["cat"] == 1  # twice in a.png, counted once
    assert [tag for tag, n in freq if n == 1] == sorted(tag for tag, n in freq if n == 1)
    table = t.format_frequency(freq, len(CAPS))
    assert "red" in table.splitlines()[1] and "67%" in table


def test_replace_whole_tag_leaves_longer_tags_alone() -> None:
    out = t.find_replace(CAPS, "cat", "kitten")
    assert out["a.png"] == "kitten, sofa, red, kitten"
    assert out["b.png"] == CAPS["b.png"]  # catgirl untouched, text byte-identical
    assert CAPS["a.png"] == "cat, sofa, red, cat"  # input not modified


def test_replace_anywhere_and_regex() -> None:
    assert t.find_replace(CAPS, "cat", "dog", whole_tag=False)["b.png"] == "sks, doggirl, red"
    out = t.find_replace(CAPS, r"cat(\w*)", r"feline\1", regex=True)
    assert out["b.png"] == "sks, felinegirl, red"
    assert out["a.png"] == "feline, sofa, red, feline"
    out = t.find_replace(CAPS, r"\bsofa\b", "couch", regex=True, whole_tag=False)
    assert out["c.png"] == "a dog on a couch"


def test_replace_with_empty_removes_tag_and_bad_regex_is_config_error() -> None:
    assert t.find_replace(CAPS, "red", "")["a.png"] == "cat, sofa, cat"
    with pytest.raises(ConfigError, match="regular expression"):
        t.find_replace(CAPS, "(", "x", regex=True)
    with pytest.raises(ConfigError):
        t.find_replace(CAPS, "", "x")


def test_remove_tag_everywhere() -> None:
    out = t.remove_tag(CAPS, "red")
    assert out == {"a.png": "cat, sofa, cat", "b.png": "sks, catgirl", "c.png": "a dog on a sofa"}


def test_add_trigger_front_without_duplicates() -> None:
    out = t.add_trigger(CAPS, "sks")
    assert out["a.png"] == "sks, cat, sofa, red, cat"
    assert out["b.png"] == "sks, catgirl, red"  # already first: unchanged
    assert out["c.png"] == "sks, a dog on a sofa"
    assert t.add_trigger_to("cat, sks, dog", "sks") == "sks, cat, dog"
    assert t.add_trigger(out, "sks") == out  # idempotent


def test_dedupe_and_sort() -> None:
    assert t.dedupe_tags(CAPS)["a.png"] == "cat, sofa, red"
    assert t.sort_tags({"x": "b, C, a"})["x"] == "a, b, C"
    assert t.sort_tags({"x": "sks, b, a"}, keep_first=1)["x"] == "sks, a, b"
    with pytest.raises(ConfigError):
        t.sort_tags(CAPS, keep_first=-1)


def test_changed_lists_only_edited_files() -> None:
    assert t.changed(CAPS, t.remove_tag(CAPS, "red")) == ["a.png", "b.png"]

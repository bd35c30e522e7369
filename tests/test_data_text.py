"""process_caption: trigger word, tag shuffle with keep_tokens, dropout, determinism."""

from __future__ import annotations

import random

import pytest

from lora_trainer.data.text import has_trigger, process_caption, split_tags


@pytest.mark.parametrize("caption,trigger,expected", [
    ("a dog on grass", "sks", "sks, a dog on grass"),
    ("sks dog on grass", "sks", "sks dog on grass"),  # already there: unchanged
    ("a photo of SKS, outdoors", "sks", "a photo of SKS, outdoors"),  # case-insensitive
    ("asks for food", "sks", "sks, asks for food"),  # whole words only
    ("", "sks", "sks"),
    ("  spaced caption  ", "", "spaced caption"),
    ("a, b,c", "", "a, b,c"),  # no shuffle: the text is kept as written
])
def test_trigger_without_shuffle(caption: str, trigger: str, expected: str) -> None:
    assert process_caption(caption, trigger, rng=random.Random(0)) == expected


def test_trigger_with_parentheses() -> None:
    assert has_trigger("a (sks:1.2) dog", "(sks:1.2)")
    assert not has_trigger("a dog", "(sks:1.2)")


def test_shuffle_keeps_first_tokens_and_all_tags() -> None:
    cap = "1girl, red hair, smile, outdoors, sky, tree, dress"
    outs = {process_caption(cap, "sks", shuffle=True, keep_tokens=2, rng=random.Random(s)) for s in range(20)}
    assert len(outs) > 5
    for out in outs:
        tags = split_tags(out)
        assert tags[:2] == ["sks", "1girl"]  # the added trigger is the first kept tag
        assert sorted(tags) == sorted(["sks"] + split_tags(cap))


def test_shuffle_keep_zero_moves_everything_and_is_deterministic() -> None:
    cap = ", ".join(f"t{i}" for i in range(10))
    a = process_caption(cap, shuffle=True, rng=random.Random(7))
    b = process_caption(cap, shuffle=True, rng=random.Random(7))
    assert a == b and a != cap
    assert sorted(split_tags(a)) == sorted(split_tags(cap))


def test_keep_tokens_larger_than_tags() -> None:
    assert process_caption("a, b", shuffle=True, keep_tokens=5, rng=random.Random(1)) == "a, b"


def test_shuffle_drops_empty_tags() -> None:
    out = process_caption("a,, b , ,c", shuffle=True, keep_tokens=3, rng=random.Random(0))
    assert out == "a, b, c"


def test_dropout() -> None:
    rng = random.Random(123)
    outs = [process_caption("a cat", "sks", dropout=0.3, rng=rng) for _ in range(2000)]
    empty = outs.count("")
    assert 480 <= empty <= 720  # ~600 expected
    assert set(outs) == {"", "sks, a cat"}
    assert process_caption("a cat", dropout=1.0, rng=random.Random(0)) == ""
    assert process_caption("a cat", dropout=0.0, rng=random.Random(0)) == "a cat"


def test_same_rng_state_same_sequence() -> None:
    def run(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [process_caption("a, b, c, d, e", "x", True, 1, 0.2, rng) for _ in range(50)]
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_tag_dropout_leaves_out_tags_after_the_kept_ones() -> None:
    """kohya's caption_tag_dropout_rate: each tag after keep_tokens is left out with that
    probability (the kept ones, the added trigger word first, never); the order of the rest stays
    unless shuffled too."""
    cap = ", ".join(f"t{i}" for i in range(10))
    rng = random.Random(5)
    outs = [split_tags(process_caption(cap, "sks", keep_tokens=2, rng=rng, tag_dropout=0.25)) for _ in range(400)]
    assert all(tags[:2] == ["sks", "t0"] for tags in outs)
    assert all(tags[2:] == sorted(tags[2:], key=lambda t: int(t[1:])) for tags in outs)  # order kept
    left_out = sum(9 - (len(tags) - 2) for tags in outs) / (9 * len(outs))
    assert 0.2 <= left_out <= 0.3  # 0.25 expected
    shuffled = process_caption(cap, shuffle=True, rng=random.Random(1), tag_dropout=0.5)
    assert set(split_tags(shuffled)) < set(split_tags(cap))
    assert process_caption(cap, tag_dropout=0.0, rng=random.Random(0)) == cap

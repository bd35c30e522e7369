"""process_caption: trigger word, tag shuffle with keep_tokens, dropout, determinism, and kohya's
caption_prefix/caption_suffix, keep_tokens_separator, secondary_separator and wildcards."""

from __future__ import annotations

import random

import pytest

from lora_trainer.config import DataConfig
from lora_trainer.data.text import (
    caption_options,
    expand_wildcards,
    has_trigger,
    process_caption,
    split_tags,
    wildcard_expansions,
)


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


# Outputs and the next rng.random() of process_caption before the caption options existed (seed 42,
# trigger "sks"): with them off, runs and their resumes must stay bit-identical.
_OLD_CAPTIONS = ["1girl, red hair, smile, outdoors, sky", "a photo of a dog", "", "sks, a, b,, c ,d"]
_OLD_RESULTS = [
    ({}, ["sks, 1girl, red hair, smile, outdoors, sky", "sks, a photo of a dog", "sks", "sks, a, b,, c ,d"],
     0.6394267984578837),
    ({"shuffle": True, "keep_tokens": 1}, ["sks, outdoors, red hair, smile, sky, 1girl", "sks, a photo of a dog",
                                           "sks", "sks, d, c, a, b"], 0.7364712141640124),
    ({"shuffle": True, "tag_dropout": 0.3, "dropout": 0.2}, ["smile, outdoors, sky, red hair",
                                                            "a photo of a dog, sks", "sks", "d, c, sks"],
     0.09671637683346401),
    ({"tag_dropout": 0.5, "keep_tokens": 2}, ["sks, 1girl, red hair", "sks, a photo of a dog", "sks",
                                              "sks, a, b, c, d"], 0.08693883262941615),
]


@pytest.mark.parametrize("options,expected,next_draw", _OLD_RESULTS)
def test_caption_options_off_keep_earlier_outputs_and_draws(options: dict, expected: list[str],
                                                            next_draw: float) -> None:
    """Off (empty, as a DataConfig's defaults pass them), the new options change neither the
    captions nor how many numbers are drawn from the rng."""
    for extra in ({}, caption_options(DataConfig())):
        rng = random.Random(42)
        assert [process_caption(c, "sks", rng=rng, **options, **extra) for c in _OLD_CAPTIONS] == expected
        assert rng.random() == next_draw


@pytest.mark.parametrize("caption,trigger,expected", [
    ("a dog", "", "masterpiece, best quality, a dog, from side"),
    ("a dog", "sks", "sks, masterpiece, best quality, a dog, from side"),  # trigger first
    ("", "sks", "sks, masterpiece, best quality, from side"),  # a trigger-only caption gets them too
])
def test_caption_prefix_and_suffix(caption: str, trigger: str, expected: str) -> None:
    """kohya's caption_prefix/caption_suffix: joined with a space (none before a leading comma)."""
    out = process_caption(caption, trigger, rng=random.Random(0), caption_prefix="masterpiece, best quality, ",
                          caption_suffix=", from side")
    assert out == expected


def test_caption_prefix_is_seen_by_the_trigger_check_shuffle_and_dropout() -> None:
    assert process_caption("a dog", "sks", rng=random.Random(0), caption_prefix="sks") == "sks a dog"
    assert process_caption("a dog", rng=random.Random(0), caption_prefix="photo of", caption_suffix="outdoors") == \
        "photo of a dog outdoors"
    outs = {process_caption("b, c, d, e", shuffle=True, keep_tokens=1, rng=random.Random(s), caption_prefix="a,")
            for s in range(20)}
    assert len(outs) > 3 and all(split_tags(o)[0] == "a" and sorted(split_tags(o)) == list("abcde") for o in outs)
    assert process_caption("a dog", dropout=1.0, rng=random.Random(0), caption_prefix="p", caption_suffix="s") == ""


def test_keep_tokens_separator_keeps_head_and_tail_in_place() -> None:
    """Before the separator: kept first (instead of keep_tokens), the added trigger first of all;
    after a second one: kept at the end; only the middle is shuffled and dropped."""
    cap = "1girl, hatsune miku ||| stage, microphone, white shirt, smile, sky ||| best quality, rating: general"
    outs = {process_caption(cap, "sks", shuffle=True, keep_tokens=5, rng=random.Random(s), tag_dropout=0.2,
                            keep_tokens_separator="|||") for s in range(30)}
    assert len(outs) > 5
    for out in outs:
        tags = split_tags(out)
        assert "|||" not in out
        assert tags[:3] == ["sks", "1girl", "hatsune miku"] and tags[-2:] == ["best quality", "rating: general"]
        assert set(tags[3:-2]) <= {"stage", "microphone", "white shirt", "smile", "sky"}
    assert {tuple(split_tags(o)[3:-2]) for o in outs} != {("stage", "microphone", "white shirt", "smile", "sky")}


def test_keep_tokens_separator_never_reaches_the_encoder() -> None:
    """Without shuffle or tag dropout the caption is fixed but still written without the separator
    (kohya would leave it in); a later occurrence reads as a comma; without one, keep_tokens rules."""
    sep = {"keep_tokens_separator": "|||"}
    assert process_caption("a, b ||| c, d", rng=random.Random(0), **sep) == "a, b, c, d"
    assert process_caption("a ||| b ||| c ||| d", rng=random.Random(0), **sep) == "a, b, c, d"
    assert process_caption("x", rng=random.Random(0), caption_prefix="a |||", **sep) == "a, x"
    assert process_caption("a, b", "sks", rng=random.Random(0), **sep) == "sks, a, b"
    outs = {process_caption("a, b, c, d, e", shuffle=True, keep_tokens=2, rng=random.Random(s), **sep)
            for s in range(20)}
    assert len(outs) > 3 and all(split_tags(o)[:2] == ["a", "b"] for o in outs)


def test_secondary_separator_makes_one_tag_of_several() -> None:
    """Joined tags move and drop together, count as one for keep_tokens, and reach the encoder
    comma-separated."""
    sec = {"secondary_separator": ";;;"}
    assert process_caption("a, sky;;;cloud ;;; day, b", rng=random.Random(0), **sec) == "a, sky, cloud, day, b"
    for s in range(40):
        out = process_caption("x;;;y, a, sky;;;cloud, b, c", shuffle=True, keep_tokens=1, rng=random.Random(s),
                              tag_dropout=0.4, **sec)
        tags = split_tags(out)
        assert ";" not in out and tags[:2] == ["x", "y"]
        assert ("sky" in tags) == ("cloud" in tags)
        if "sky" in tags:
            assert tags.index("cloud") == tags.index("sky") + 1


def test_caption_options_come_from_the_data_config() -> None:
    cfg = DataConfig(caption_prefix="p", caption_suffix="s", keep_tokens_separator="|||", secondary_separator=";;;")
    assert caption_options(cfg) == {"caption_prefix": "p", "caption_suffix": "s", "keep_tokens_separator": "|||",
                                    "secondary_separator": ";;;", "enable_wildcard": False}
    assert process_caption("a ||| b;;;c", rng=random.Random(0), **caption_options(cfg)) == "p a, b, c s"
    assert caption_options(DataConfig(enable_wildcard=True))["enable_wildcard"] is True


# Captions with kohya's wildcard syntax and several lines, with their outputs and the next
# rng.random() before enable_wildcard existed (seed 42, trigger "sks"): off, they stay literal
# (a multi-line caption is used whole, its newlines kept) and draw nothing more.
_WILD_CAPTIONS = ["a {red|blue} car, {x|y|z}", "line one, a\nline two, b\n\nline three", "{a|{b|c}}, d, {e"]
_WILD_OFF = [
    ({}, ["sks, a {red|blue} car, {x|y|z}", "sks, line one, a\nline two, b\n\nline three", "sks, {a|{b|c}}, d, {e"],
     0.6394267984578837),
    ({"shuffle": True, "keep_tokens": 1}, ["sks, {x|y|z}, a {red|blue} car",
                                           "sks, b\n\nline three, a\nline two, line one", "sks, d, {e, {a|{b|c}}"],
     0.1395379285251439),
    ({"shuffle": True, "tag_dropout": 0.3, "dropout": 0.2}, ["", "sks", "d, {a|{b|c}}, {e"], 0.6981393949882269),
]


@pytest.mark.parametrize("options,expected,next_draw", _WILD_OFF)
def test_wildcards_off_keep_braces_and_lines_and_the_draws(options: dict, expected: list[str],
                                                           next_draw: float) -> None:
    for extra in ({}, {"enable_wildcard": False}, caption_options(DataConfig())):
        rng = random.Random(42)
        assert [process_caption(c, "sks", rng=rng, **options, **extra) for c in _WILD_CAPTIONS] == expected
        assert rng.random() == next_draw


def test_wildcards_pick_an_option_of_each_choice_per_seed() -> None:
    """On, each {a|b|c} becomes one of its options, drawn from the caption's rng: the same for a
    seed, every option (and every combination) reached over seeds, no braces left."""
    cap = "a {red|blue|green} car, {day|night}"
    outs = [process_caption(cap, rng=random.Random(s), enable_wildcard=True) for s in range(200)]
    assert outs == [process_caption(cap, rng=random.Random(s), enable_wildcard=True) for s in range(200)]
    assert set(outs) == {f"a {c} car, {t}" for c in ("red", "blue", "green") for t in ("day", "night")}
    assert wildcard_expansions(cap, 100) == sorted(set(outs))
    # an empty option makes a tag optional; a caption without choices draws nothing
    assert {process_caption("a, {b|}", rng=random.Random(s), enable_wildcard=True) for s in range(50)} == {"a, b", "a,"}
    rng = random.Random(5)
    assert process_caption("plain, {one}", rng=rng, enable_wildcard=True) == "plain, one"
    assert rng.random() == random.Random(5).random()


def test_wildcards_pick_one_line_of_a_multi_line_caption() -> None:
    """On, a caption with several lines trains on one non-blank line per draw (each one over
    seeds); its choices are expanded after the pick, so a choice never spans lines."""
    cap = "line one, {a|b}\n\n  line two  \nline three"
    outs = {process_caption(cap, "sks", rng=random.Random(s), enable_wildcard=True) for s in range(100)}
    assert outs == {"sks, line one, a", "sks, line one, b", "sks, line two", "sks, line three"}
    assert process_caption("x {a\nb} y", rng=random.Random(0), enable_wildcard=True) in ("x {a", "b} y")
    assert expand_wildcards(cap) == "line one, a"  # no rng: the first line and options (the UI's preview)


@pytest.mark.parametrize("caption,reachable", [
    ("{a|{b|c}}", {"a", "b", "c"}),  # nested: innermost first
    ("x {a|b", {"x {a|b"}),  # unbalanced: left as written
    ("x a|b} y", {"x a|b} y"}),
    ("{{a|b}", {"{a", "{b"}),  # the pair that closes is the choice; the lone brace stays
    ("{}, z", {", z"}),
])
def test_wildcard_braces_nest_and_unpaired_ones_stay(caption: str, reachable: set[str]) -> None:
    outs = {expand_wildcards(caption, random.Random(s)) for s in range(100)}
    assert outs == reachable and set(wildcard_expansions(caption, 100)) == reachable


def test_wildcards_come_first_so_everything_else_sees_the_choice() -> None:
    """Expanded right after dropout: the trigger word check, prefix/suffix, keep_tokens separator
    and shuffle see the chosen text (an option holding the trigger word keeps it from being
    added; an option holding a separator splits there)."""
    opts = {"enable_wildcard": True, "caption_prefix": "art,", "keep_tokens_separator": "|||"}
    outs = {process_caption("{sks dog|a cat} ||| {b, c|d}", "sks", shuffle=True, rng=random.Random(s), **opts)
            for s in range(200)}
    assert outs == {"art, sks dog, b, c", "art, sks dog, c, b", "art, sks dog, d",
                    "sks, art, a cat, b, c", "sks, art, a cat, c, b", "sks, art, a cat, d"}
    assert process_caption("{a|b}", dropout=1.0, rng=random.Random(0), enable_wildcard=True) == ""
    assert wildcard_expansions("{a|b}{c|d}{e|f}", 7) is None  # 8 ways: past the limit

"""Weighted captions (kohya's weighted_captions): the WebUI's emphasis syntax, the weighted
encoding of the SD families, and which reading a run and a WebUI host use."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from train_helpers import TinyHost, lora_tensors, make_data, tiny_bundle, tiny_config

from lora_trainer.config import build_config, flatten_user_dict
from lora_trainer.data.emphasis import escape_emphasis, parse_emphasis
from lora_trainer.errors import ConfigError
from lora_trainer.families import sd_text

W = 1.1


@pytest.mark.parametrize("text,want", [
    ("a red cat", [("a red cat", 1.0)]),
    ("", [("", 1.0)]),
    ("a (red) cat", [("a ", 1.0), ("red", W), (" cat", 1.0)]),
    ("((red)) [cat]", [("red", W * W), (" ", 1.0), ("cat", 1 / W)]),
    ("(red:1.5) cat, (blue, green:0.5)", [("red", 1.5), (" cat, ", 1.0), ("blue, green", 0.5)]),
    ("(a (b:2) c)", [("a ", W), ("b", 2 * W), (" c", W)]),
    ("saber \\(fate\\) \\\\ x", [("saber (fate) \\ x", 1.0)]),
    ("open (left", [("open ", 1.0), ("left", W)]),  # a bracket left open weighs the rest
    ("a :1.2) b]", [("a :1.2) b]", 1.0)]),  # closers with nothing open are text
])
def test_the_emphasis_syntax(text, want):
    got = parse_emphasis(text)
    assert [f for f, _ in got] == [f for f, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want])


@pytest.mark.parametrize("text", ["saber (fate)", "a [b] c", "x (y:1.5) \\ z", "((", "\\(", ""])
def test_escaped_text_reads_as_itself(text):
    assert parse_emphasis(escape_emphasis(text)) == [(text, 1.0)]


@pytest.fixture(scope="module")
def sd1():
    return tiny_bundle("sd1")


def test_weighted_tokens_are_the_plain_ones_with_their_weights(sd1):
    tok = sd1.extras["tokenizers"][0]
    plain = sd_text.tokenize(tok, ["a red cat sitting", "a red cat sitting"], torch.device("cpu"))
    ids, weights = sd_text.tokenize_weighted(tok, ["a red cat sitting", "a (red cat:1.5) sitting"], torch.device("cpu"))
    assert torch.equal(ids, plain) and torch.equal(weights[0], torch.ones(77))
    red_cat = tok("red cat").input_ids[1:-1]
    start = 1 + len(tok("a").input_ids[1:-1])
    want = torch.ones(77)
    want[start:start + len(red_cat)] = 1.5
    assert torch.equal(weights[1], want)
    long_ids, long_w = sd_text.tokenize_weighted(tok, ["(cat:2) " * 60], torch.device("cpu"))  # over 75 tokens
    assert long_ids.shape == (1, 77) and long_ids[0, -1] == tok.eos_token_id and long_w[0, -1] == 1.0


def test_weights_move_emphasis_between_tokens_and_keep_the_mean():
    hidden = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([[1.0, 1.5, 1.5, 1.0, 1.0], [1.0] * 5])
    got = sd_text.apply_weights(hidden, weights)
    scaled = hidden * weights.unsqueeze(-1)
    want = scaled * (hidden.mean(dim=(1, 2)) / scaled.mean(dim=(1, 2))).view(2, 1, 1)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(got[1], hidden[1])  # no emphasis: the very same numbers
    assert torch.allclose(got.mean(dim=(1, 2)), hidden.mean(dim=(1, 2)), atol=1e-6)
    symmetric = torch.tensor([[[1.0, -1.0]] * 5])  # a mean of 0 (a plain layer norm's): nothing to scale back to
    assert torch.equal(sd_text.apply_weights(symmetric, weights[:1]), symmetric * weights[:1].unsqueeze(-1))


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_weighted_encoding_without_brackets_is_the_plain_one(arch):
    b = tiny_bundle(arch)
    captions = ["a red cat", "two dogs, grass"]
    with torch.no_grad():
        plain, weighted = b.encode_text(captions), b.encode_weighted(captions)
        emphasis = b.encode_weighted(["a (red:1.5) cat", "two dogs, grass"])
        brackets = b.encode_text(["a (red:1.5) cat"])
    assert plain.keys() == weighted.keys() and all(torch.equal(plain[k], weighted[k]) for k in plain)
    assert not torch.allclose(emphasis["context"][0], plain["context"][0], atol=1e-4)  # red weighed
    assert torch.equal(emphasis["context"][1], plain["context"][1])
    if arch == "sdxl":  # the pooled embedding is the unweighted tokens' (as kohya's)
        assert torch.allclose(emphasis["pooled"][0], plain["pooled"][0], atol=1e-6)
    assert not torch.allclose(brackets["context"][0], emphasis["context"][0], atol=1e-4)  # plain text: brackets kept


def test_settings_and_refusals(tmp_path):
    assert build_config(flatten_user_dict({"weighted_captions": True})).data.weighted_captions
    with pytest.raises(ConfigError, match="data.weighted_captions: flux1 cannot weigh caption tokens"):
        build_config(flatten_user_dict({"weighted_captions": True, "model.arch": "flux1"}))
    bundle = dataclasses.replace(tiny_bundle("sd1"), encode_weighted=None)
    from lora_trainer.train.trainer import Trainer

    data = make_data(tmp_path / "data", n=2)
    with pytest.raises(ConfigError, match="data.weighted_captions: this sd1 model cannot weigh caption tokens"):
        Trainer(tiny_config(data, tmp_path / "out", **{"data.weighted_captions": True}),
                host=TinyHost(bundle=bundle)).run()


@pytest.fixture(scope="module")
def bracket_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = make_data(tmp_path_factory.mktemp("emph"), n=3)
    (data / "metadata.csv").unlink()
    for n, image in enumerate(sorted(data.glob("*.png"))):
        image.with_suffix(".txt").write_text(f"a (red circle:1.{n + 3}) on grass", encoding="utf-8")
    return data


def test_a_run_reads_captions_as_asked(bracket_data, tmp_path):
    from lora_trainer.train.trainer import Trainer

    host = TinyHost()
    values = {"train.max_train_steps": 3, "output.save_precision": "fp32", "optim.learning_rate": 1e-2}
    calls: dict[str, list[str]] = {"plain": [], "weighted": []}
    encode_text, encode_weighted = host.bundle.encode_text, host.bundle.encode_weighted
    host.bundle.encode_text = lambda c: calls["plain"].extend(c) or encode_text(c)
    host.bundle.encode_weighted = lambda c: calls["weighted"].extend(c) or encode_weighted(c)
    plain = Trainer(tiny_config(bracket_data, tmp_path / "a", **values), host=host).run()
    assert calls["plain"] and not calls["weighted"]
    calls["plain"].clear()
    weighted = Trainer(tiny_config(bracket_data, tmp_path / "b", **values, **{"data.weighted_captions": True}),
                       host=host).run()
    assert calls["weighted"] and not calls["plain"]
    assert all("(red circle:1." in c for c in calls["weighted"]), calls["weighted"]
    a, b = lora_tensors(plain.lora_path), lora_tensors(weighted.lora_path)
    assert any(not torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# --- long captions: data.max_token_length, in chunks of 75 as the WebUI reads a long prompt -------
def test_long_captions_fill_chunks_of_75_tokens(sd1):
    tok = sd1.extras["tokenizers"][0]
    words = [f"tag{n}" for n in range(120)]
    caption = ", ".join(words)
    inner = tok(caption, truncation=False).input_ids[1:-1]
    assert len(inner) > 225  # longer than three chunks: cut after 225 tokens
    ids, weights = sd_text.tokenize_weighted(tok, [caption, "a cat"], torch.device("cpu"), chunks=3, weighted=False)
    assert ids.shape == weights.shape == (6, 77) and torch.equal(weights, torch.ones(6, 77))
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    for n in range(3):
        assert ids[n].tolist() == [bos, *inner[75 * n:75 * (n + 1)], eos]
    short = tok("a cat").input_ids
    assert ids[3].tolist() == short + [pad] * (77 - len(short))  # as tokenize() lays it out
    assert ids[4].tolist() == ids[5].tolist() == [bos, eos] + [pad] * 75  # the chunks a short caption leaves


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_chunked_encoding_joins_the_chunks_passes(arch):
    b = tiny_bundle(arch)
    tok = b.extras["tokenizers"][0]
    caption = ", ".join(f"word{n}" for n in range(60))  # more than 75 tokens
    encode = b.make_encoder(False, 2)
    with torch.no_grad():
        two = encode([caption, "a cat"])
        one = b.encode_text(["a cat"])
        ids, _ = sd_text.tokenize_weighted(tok, [caption], torch.device("cpu"), chunks=2, weighted=False)
        te = b.text_encoders[0].module
        passes = te(ids, output_hidden_states=True)
        first = passes.hidden_states[-2] if arch == "sdxl" else passes.last_hidden_state
    assert two["context"].shape[:2] == (2, 154)
    width = first.shape[-1]
    # (other batch sizes than the reference's: equal to float rounding)
    assert torch.allclose(two["context"][0, :, :width], first.reshape(154, width), atol=1e-6)  # the passes in turn
    assert torch.allclose(two["context"][1:, :77], one["context"], atol=1e-6)  # a short caption's first chunk
    if arch == "sdxl":
        assert torch.allclose(two["pooled"][1:], one["pooled"], atol=1e-6)  # the first chunk's pooled embedding
    weighted = b.make_encoder(True, 2)(["a (cat:1.5)"])["context"]
    assert weighted.shape[1] == 154 and not torch.allclose(weighted[:, :77], one["context"], atol=1e-4)


def test_a_run_with_long_captions_conditions_on_every_chunk(bracket_data, tmp_path):
    from lora_trainer.train.trainer import Trainer

    host = TinyHost()
    contexts: list[int] = []
    predict = host.bundle.predict
    host.bundle.predict = lambda x, t, cond, size: contexts.append(cond["context"].shape[1]) or predict(x, t, cond,
                                                                                                         size)
    values = {"train.max_train_steps": 2, "data.max_token_length": 225, "sample.prompt": "a circle",
              "sample.steps": 1}
    Trainer(tiny_config(bracket_data, tmp_path / "a", **values), host=host).run()
    assert contexts and set(contexts) == {231}  # training steps and the sample alike
    with pytest.raises(ConfigError, match="data.max_token_length: 60 must be at least 75"):
        build_config({"max_token_length": 60})
    assert build_config({"max_token_length": 150}).data.token_chunks == 2

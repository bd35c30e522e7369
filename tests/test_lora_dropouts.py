"""kohya's and LyCORIS' rank and module dropout: what a training step computes with them, and
how they are set, recorded and refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_fixtures import make_bundle, net_cfg
from peft import inject_adapter_in_model
from torch import nn
from train_helpers import TinyHost, lora_tensors, make_data, stopped_and_resumed, tiny_config

from lora_trainer.config import build_config, flatten_user_dict
from lora_trainer.errors import ConfigError
from lora_trainer.lora import variants
from lora_trainer.lora.dora import ADAPTER
from lora_trainer.lora.files import read_lora_file
from lora_trainer.lora.inject import inject_lora
from lora_trainer.lora.metadata import network_module_args
from lora_trainer.train.lora_forward import lean_lora_forward
from lora_trainer.train.speed import _plain_lora_without_dropout

RANK, ALPHA = 4, 2.0


def _lora_root(layers: list[nn.Module], rank_dropout: float, module_dropout: float) -> nn.Sequential:
    """``layers`` with peft LoRA on each, random non-zero weights, and kohya's dropouts."""
    root = nn.Sequential(*layers)
    targets = [str(i) for i in range(len(layers))]
    inject_adapter_in_model(variants.peft_config("lora", RANK, ALPHA, targets, {}, {}, 0.0), root,
                            adapter_name=ADAPTER)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in root.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            p.requires_grad_("lora_" in name)
    on = bool(rank_dropout or module_dropout)
    assert variants.kohya_dropouts(root, rank_dropout, module_dropout) == (len(layers) if on else 0)
    return root


def _by_hand(layer: nn.Module, x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """kohya's LoRAModule.forward: base + up(down(x) * mask / (1 - p)) * alpha / rank."""
    down, up = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    training = down.training
    down.eval()  # the layer's own rank dropout stays out of the reference
    lx = down(x)
    down.train(training)
    if keep is not None:
        lx = lx * keep / (1 - p)
    return layer.base_layer(x) + up(lx) * (ALPHA / RANK)


@pytest.mark.parametrize("shape,conv", [((3, 6), False), ((3, 5, 6), False), ((3, 6, 4, 4), True)])
def test_rank_dropout_drops_ranks_per_sample_and_scales_the_rest(shape, conv):
    layer = nn.Conv2d(6, 5, 3, padding=1) if conv else nn.Linear(6, 5)
    root = _lora_root([layer], 0.5, 0.0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    root.train()
    torch.manual_seed(11)
    got = root(x)
    torch.manual_seed(11)
    keep = (torch.rand((shape[0], RANK)) > 0.5).float()
    assert 0 < keep.sum() < keep.numel()  # the seed drops some ranks and keeps others
    keep = keep.view(shape[0], RANK, 1, 1) if conv else keep.view(shape[0], *[1] * (len(shape) - 2), RANK)
    with torch.no_grad():
        want = _by_hand(root[0], x, keep, 0.5)
        assert torch.allclose(got, want, atol=1e-6)
        assert not torch.allclose(got, _by_hand(root[0], x, None, 0.5), atol=1e-3)
    root.eval()  # no dropout outside training
    with torch.no_grad():
        assert torch.allclose(root(x), _by_hand(root[0], x, None, 0.5), atol=1e-6)


def _draws(seed: int, n: int, p: float = 0.5) -> list[bool]:
    torch.manual_seed(seed)
    return [bool(torch.rand(1) < p) for _ in range(n)]


def test_module_dropout_leaves_a_whole_update_out_and_its_weights_ungraded():
    root = _lora_root([nn.Linear(6, 6), nn.Linear(6, 6)], 0.0, 0.5)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(1))
    seed = next(s for s in range(100) if _draws(s, 2) == [True, False])  # drops the first layer only
    root.train()
    torch.manual_seed(seed)
    got = root(x)
    with torch.no_grad():
        want = _by_hand(root[1], root[0].base_layer(x), None, 0.0)  # the first layer's update left out
        assert torch.allclose(got, want, atol=1e-6)
    got.sum().backward()
    assert root[0].lora_A[ADAPTER].weight.grad is None and root[0].lora_B[ADAPTER].weight.grad is None
    assert root[1].lora_A[ADAPTER].weight.grad is not None
    assert not root[0].disable_adapters and not root[1].disable_adapters  # nothing stays switched off
    root.eval()
    with torch.no_grad():
        assert torch.allclose(root(x), _by_hand(root[1], _by_hand(root[0], x, None, 0.0), None, 0.0), atol=1e-6)


def test_layers_with_dropouts_keep_peft_forward_and_casts():
    root = _lora_root([nn.Linear(6, 6)], 0.1, 0.0)
    plain = _lora_root([nn.Linear(6, 6)], 0.0, 0.0)
    assert not _plain_lora_without_dropout(root[0]) and _plain_lora_without_dropout(plain[0])
    lean_lora_forward(root)
    lean_lora_forward(plain)
    assert "forward" not in vars(root[0]) and "forward" in vars(plain[0])


@pytest.mark.parametrize("typ", ["loha", "lokr"])
def test_loha_and_lokr_take_lycoris_dropouts(typ):
    bundle = make_bundle("sd1")
    net = inject_lora(bundle, net_cfg(type=typ, rank_dropout=0.25, module_dropout=0.125))
    layers = [m for m in bundle.unet.modules() if isinstance(m, variants.LYCORIS_LAYERS)]
    assert layers and all(m.rank_dropout[ADAPTER] == 0.25 and m.module_dropout[ADAPTER] == 0.125 for m in layers)
    if typ == "lokr" and hasattr(layers[0], "rank_dropout_scale"):  # kept rows scaled up, as peft < 0.14 does
        assert all(m.rank_dropout_scale[ADAPTER] for m in layers)
    net.remove()


def test_lora_and_locon_layers_of_a_network_get_kohyas_dropouts():
    bundle = make_bundle("sd1")
    net = inject_lora(bundle, net_cfg(type="locon", conv_rank=2, rank_dropout=0.1, module_dropout=0.2))
    marked = [m for m in bundle.unet.modules() if getattr(m, variants.DROPOUT_MARK, None) == (0.1, 0.2)]
    assert len(marked) == sum(1 for s in net.layout.values() if s.root == "unet")
    assert any(isinstance(m.base_layer, nn.Conv2d) for m in marked)
    net.remove()
    assert not any(hasattr(m, variants.DROPOUT_MARK) for m in bundle.unet.modules())


def test_settings_metadata_and_errors():
    n = build_config(flatten_user_dict({"network_args": ["rank_dropout=0.1", "module_dropout=0.05"]})).network
    assert (n.rank_dropout, n.module_dropout) == (0.1, 0.05)
    assert network_module_args(n)[1] == {"rank_dropout": "0.1", "module_dropout": "0.05"}
    assert network_module_args(build_config({}).network)[1] == {}  # off: not recorded
    for values, message in [({"network.rank_dropout": 1.0}, "network.rank_dropout: 1.0 must be in [0, 1)"),
                            ({"network.module_dropout": -0.1}, "network.module_dropout: -0.1 must be in [0, 1)"),
                            ({"network.type": "dora", "network.rank_dropout": 0.1},
                             "network.rank_dropout: 0.1 works with network.type lora, locon, loha or lokr, not dora")]:
        with pytest.raises(ConfigError) as e:
            build_config(flatten_user_dict(values))
        assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_open_clip_attention_refuses_them():
    bundle = make_bundle("sd2", te_naming="open_clip")
    with pytest.raises(ConfigError, match="rank_dropout / module_dropout: the text encoder's nn.MultiheadAttention"):
        inject_lora(bundle, net_cfg(rank_dropout=0.1))
    inject_lora(bundle, net_cfg(rank_dropout=0.1, train_text_encoder=False)).remove()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("drop-data"))


@pytest.mark.parametrize("typ", ["lora", "loha"])
def test_runs_with_dropouts_resume_exactly_and_record_them(typ, tmp_path, data):
    from lora_trainer.train.trainer import Trainer

    host = TinyHost()
    values = {"train.max_train_steps": 5, "train.batch_size": 2, "network.type": typ, "network.rank_dropout": 0.3,
              "network.module_dropout": 0.3, "train.gradient_checkpointing": True, "optim.learning_rate": 5e-3,
              "output.save_precision": "fp32"}
    straight = Trainer(tiny_config(data, tmp_path / "a", **values), host=host).run()
    resumed = stopped_and_resumed(data, tmp_path / "b", host, **values)
    plain = Trainer(tiny_config(data, tmp_path / "c", **{**values, "network.rank_dropout": 0.0,
                                                          "network.module_dropout": 0.0}), host=host).run()
    a, b, c = (lora_tensors(r.lora_path) for r in (straight, resumed, plain))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert any(not torch.allclose(a[k], c[k], atol=1e-5) for k in a)  # the dropouts changed the training
    args = json.loads(read_lora_file(straight.lora_path)[1]["ss_network_args"])
    assert (args["rank_dropout"], args["module_dropout"]) == ("0.3", "0.3")

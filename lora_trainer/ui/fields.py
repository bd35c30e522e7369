"""Config fields <-> gradio components, by field path (never by position).

:func:`make_field` builds the right component for a :class:`TrainConfig` field from its type
annotation and help text; the tab keeps the results in a ``{field_path: component}`` map.
:func:`config_from_values` and :func:`values_from_config` convert in both directions through
``config.build_config``, so the UI accepts exactly what YAML and ``--set`` accept.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union

from lora_trainer import config as cfgmod
from lora_trainer.config import TrainConfig
from lora_trainer.ui import compat

# Every image-task field the tab shows ("task" is fixed to "image" here; llm has its own section).
UI_FIELDS: list[str] = [p for p in cfgmod.all_field_paths() if p != "task"]
# Optional numbers shown as number inputs. An emptied number input sends 0 on gradio 3.x (None on
# 4.x+), so these are the ones where 0 is no setting of its own and reads as empty. Others (e.g.
# data.prefetch, where 0 turns it off and empty means the default) stay text boxes.
ZERO_IS_EMPTY = {"train.max_train_steps", "optim.unet_lr", "optim.text_encoder_lr", "train.min_snr_gamma",
                 "sample.width", "sample.height", "optim.loraplus_lr_ratio", "network.scale_weight_norms",
                 "train.max_timestep"}


def _kind(path: str) -> tuple[str, Any]:
    """("choice", choices) | ("bool", None) | ("int", None) | ("float", None) | ("text", None)."""
    tp = cfgmod._type_of(path)
    origin = typing.get_origin(tp)
    choices_of = cfgmod.field_info(path).metadata.get("choices")
    if choices_of is not None:  # known at run time (the model families)
        return "choice", [str(c) for c in choices_of()]
    if origin is Literal:
        return "choice", [str(c) for c in typing.get_args(tp)]
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if path in ZERO_IS_EMPTY and args in ([int], [float]):  # a number input; empty (or 0) means None
            return ("int" if args == [int] else "float"), None
        return "text", None  # other optional values: a textbox, empty means None
    if origin is list:
        return "text", None  # "a, b"; empty means []
    return {bool: "bool", int: "int", float: "float"}.get(tp, "text"), None


# The WebUIs save and restore the tab's values in ui-config.json keyed by label (A1111's and
# Forge's ui_loadsave): two fields with one label would share a saved value, so a field whose name
# another section also has gets a label of its own.
LABELS = {"train.guidance_scale": "training guidance", "sample.seed": "sample seed",
          "train.save_every_n_epochs": "save every n epochs", "sample.every_n_epochs": "sample every n epochs"}


# Text fields that take several lines (a prompt each), and how many their box shows.
TEXT_LINES = {"sample.prompt": 2}


def label_of(path: str) -> str:
    return LABELS.get(path) or path.split(".", 1)[-1].replace("_", " ")


def make_field(path: str, elem_prefix: str = "lt-", **overrides: Any) -> Any:
    """The component for field ``path`` with its help text as info, elem_id ``<prefix>f-<path>``."""
    g = compat.gr()
    kind, choices = _kind(path)
    help_ = cfgmod.field_info(path).metadata.get("help", "")
    value = to_component(TrainConfig().get(path), kind)
    kw: dict[str, Any] = {"label": label_of(path), "info": help_, "value": value,
                          "elem_id": f"{elem_prefix}f-{path.replace('.', '-').replace('_', '-')}",
                          "elem_classes": [f"{elem_prefix}field"]}
    kw.update(overrides)
    if kind == "choice":
        return g.Dropdown(choices=choices, **kw)
    if kind == "bool":
        return g.Checkbox(**kw)
    if kind in ("int", "float"):
        return g.Number(precision=0 if kind == "int" else None, **kw)
    return g.Textbox(lines=TEXT_LINES.get(path, 1), **kw)


def to_component(value: Any, kind: str) -> Any:
    if value is None:
        return None if kind in ("int", "float") else ""  # an empty number input holds None
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if kind == "choice":
        return str(value)
    return value


def config_from_values(paths: Sequence[str], values: Sequence[Any], base: TrainConfig | None = None) -> TrainConfig:
    """Build a TrainConfig from component values in the order of ``paths`` (ConfigError names a field)."""
    if len(paths) != len(values):
        raise ValueError(f"{len(paths)} field paths but {len(values)} values")
    raw: dict[str, Any] = {}
    for path, value in zip(paths, values, strict=True):
        kind, _ = _kind(path)
        if isinstance(value, str) and kind in ("int", "float", "bool"):
            value = value.strip()
        if path in ZERO_IS_EMPTY and value in (0, "0"):
            value = None
        raw[path] = value
    return cfgmod.build_config(raw, base=base)


def values_from_config(cfg: TrainConfig, paths: Sequence[str]) -> list[Any]:
    """Component values for ``paths`` from a config (None -> "" or an empty number, lists -> "a, b")."""
    return [to_component(cfg.get(p), _kind(p)[0]) for p in paths]


def config_from_yaml_text(text: str) -> TrainConfig:
    """Parse YAML (nested sections, dotted keys or flat aliases) into a TrainConfig."""
    return config_from_data(yaml_text_data(text), "config YAML")


def yaml_text_data(text: str) -> dict[str, Any]:
    """The mapping a YAML text holds, or ConfigError naming the line to fix."""
    import yaml

    from lora_trainer.errors import ConfigError

    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        from lora_trainer.config_schema import yaml_error_message

        raise ConfigError(yaml_error_message(e, "config YAML")) from None
    if not isinstance(data, dict):
        raise ConfigError("config YAML: expected a mapping of keys to values at the top level")
    return data


def config_from_data(data: dict[str, Any], source: str) -> TrainConfig:
    return cfgmod.build_config(cfgmod.flatten_user_dict(data, source=source))

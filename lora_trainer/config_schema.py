"""ConfigSchema: filling a config family's nested dataclasses by key, with one-line errors.

The image :class:`~lora_trainer.config.TrainConfig` and the text-LoRA
:class:`~lora_trainer.llm.config.LLMTrainConfig` share this: key resolution (field paths, flat
aliases, bare field names, "did you mean"), YAML flattening, value coercion, ``--set`` parsing,
and the generated commented example and reference table. Each family supplies only its data.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

from lora_trainer.errors import ConfigError


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        parts = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_describe(a) for a in parts) + " or empty"
    if origin is list:
        return "a list of " + _describe(typing.get_args(tp)[0]) + "s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(tp, str(tp))


def check_choices(value: Any, field: dataclasses.Field[Any], where: str) -> Any:
    """A text field whose allowed values are known only at run time (``choices`` in its metadata:
    a function returning them, e.g. the registered model families): the value, normalised to the
    choice's spelling, or a one-line ConfigError naming the choices."""
    choices_of = field.metadata.get("choices")
    if choices_of is None or not isinstance(value, str):
        return value
    choices = [str(c) for c in choices_of()]
    match = next((c for c in choices if c.lower() == value.strip().lower()), None)
    if match is None:
        raise ConfigError(f"{where}: {value!r} is not allowed; expected one of "
                          f"{', '.join(repr(c) for c in choices)}{_suggest(value, choices)}")
    return match


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI/UI value to the field's type, or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: {value!r} is not valid; expected {_describe(tp)}")
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        for a in args:
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value.strip().lower() in [str(c).lower() for c in choices]:
            return next(c for c in choices if str(c).lower() == value.strip().lower())
        if value in choices:
            return value
        hint = _suggest(str(value), [str(c) for c in choices])
        raise ConfigError(f"{where}: {value!r} is not allowed; expected {_describe(tp)}{hint}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if value is None or value == "":
            return []
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, item, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise bad from None
                if f.is_integer():
                    return int(f)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad



# Errors about something opened and never closed: PyYAML notices them lines later (often at the
# end of the file); the line to fix is where the construct began (its "context" mark).
_OPENED_CONTEXTS = ("while scanning a quoted scalar", "while parsing a flow sequence",
                    "while parsing a flow mapping", "while scanning a block scalar")


def yaml_error_message(error: Exception, source: str) -> str:
    """``source:LINE: not valid YAML: ...`` naming the line to fix, for a PyYAML error."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark, context = getattr(error, "problem_mark", None), getattr(error, "context", None) or ""
    start = getattr(error, "context_mark", None)
    if start is not None and context.startswith(_OPENED_CONTEXTS):
        what = context.replace("while scanning ", "").replace("while parsing ", "")
        noticed = f" at line {mark.line + 1}" if mark is not None else ""
        return f"{source}:{start.line + 1}: not valid YAML: {what} begun here is not closed ({problem}{noticed})"
    where = f":{mark.line + 1}" if mark is not None else ""
    return f"{source}{where}: not valid YAML: {problem}"


class ConfigRoot:
    """Conversions every root config dataclass (a "task" field plus sections) has."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def get(self, path: str) -> Any:
        """The value at a field path such as ``network.rank``."""
        section, name = _split_path(path)
        return getattr(getattr(self, section), name) if section else getattr(self, name)


@dataclass(frozen=True)
class ConfigSchema:
    """How a config family (image TrainConfig, text-LoRA LLMTrainConfig) is filled by key.

    One implementation of key resolution (field paths, flat aliases, bare field names, "did you
    mean"), YAML flattening, coercion into the dataclasses, ``--set`` parsing, and the generated
    example and reference; each family supplies only its data.
    """

    root: type  # dataclass with a "task" field and one field per section
    sections: dict[str, type]
    aliases: dict[str, str]
    value_maps: dict[str, Callable[[Any], Any]]  # alias keys whose values mean something else
    label: str  # "config", "text-LoRA config": how errors name it
    help_hint: str  # where to see every key
    example_header: tuple[str, ...]
    nested: str | None = None  # a section whose keys are read as if at the top level ("llm")
    foreign: tuple[tuple[str, str], ...] = ()  # (top-level key, error) for keys of another family
    # Keys that stand for several fields (kohya's network_args): key -> function of the value
    # giving {field path: value}. Where two of them set one field, the later one here wins.
    expanders: dict[str, Callable[[Any], dict[str, Any]]] = field(default_factory=dict)
    # Keys of other trainers that change nothing here: key -> (values accepted, None: any; why).
    # Accepted and named in one warning; a value they do not accept is an error with the why.
    ignored: dict[str, tuple[Callable[[Any], bool] | None, str]] = field(default_factory=dict)
    # Tables of other trainers' files whose keys are read as top-level keys ("training_arguments").
    key_groups: Callable[[str], bool] = lambda name: False

    def field_paths(self) -> list[str]:
        paths = ["task"]
        for section, cls in self.sections.items():
            paths += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
        return paths

    def _owner(self, path: str) -> tuple[type, str]:
        section, name = _split_path(path)
        if section is None:
            return self.root, name
        if section not in self.sections:
            raise ConfigError(f"unknown {self.label} field '{path}'")
        return self.sections[section], name

    def field_info(self, path: str) -> dataclasses.Field[Any]:
        cls, name = self._owner(path)
        for f in dataclasses.fields(cls):
            if f.name == name:
                return f
        raise ConfigError(f"unknown {self.label} field '{path}'")

    def type_of(self, path: str) -> Any:
        cls, name = self._owner(path)
        return typing.get_type_hints(cls)[name]

    def resolve(self, key: str, section: str | None = None) -> str:
        """A user key (field path, 'section.field', flat alias or unique bare field name) -> path."""
        paths = self.field_paths()
        if section is not None:
            if f"{section}.{key}" in paths:
                return f"{section}.{key}"
            names = [p.split(".", 1)[1] for p in paths if p.startswith(section + ".")]
            raise ConfigError(f"unknown key '{key}' in section '{section}'{_suggest(key, names)}; "
                              f"allowed: {', '.join(names)}")
        if key in paths:
            return key
        if "." in key and key.split(".", 1)[0] in self.sections:
            return self.resolve(key.split(".", 1)[1], key.split(".", 1)[0])
        if key in self.aliases:
            return self.aliases[key]
        matches = [p for p in paths if p.endswith("." + key)]
        if len(matches) == 1:
            return matches[0]
        raise ConfigError(f"unknown {self.label} key '{key}'{_suggest(key, self._options())}; {self.help_hint}")

    def flatten(self, data: dict[str, Any], source: str = "config") -> dict[str, Any]:
        """Nested sections, 'a.b' keys and flat aliases -> {field_path: raw value}."""
        out: dict[str, Any] = {}
        origin: dict[str, str] = {}
        order = list(self.expanders)

        def put(path: str, value: Any, key: str) -> None:
            if path in out and origin[path] != key:
                if key in order and origin[path] in order:
                    if order.index(key) < order.index(origin[path]):
                        return
                else:
                    raise ConfigError(f"{source}: '{key}' and '{origin[path]}' both set {path}; keep one")
            out[path], origin[path] = value, key

        foreign = dict(self.foreign)
        unknown: list[str] = []
        for key, value in self.top_level(data).items():
            if key == self.nested and isinstance(value, dict):
                for path, v in self.flatten(value, source).items():
                    put(path, v, f"{key}.{path}")
            elif key in self.sections and isinstance(value, dict):
                for sub, v in value.items():
                    put(self.resolve(str(sub), key), v, f"{key}.{sub}")
            elif key in foreign:
                raise ConfigError(f"{source}: {foreign[key]}")
            elif key in self.expanders:
                for path, v in self.expanders[key](value).items():
                    put(self.resolve(path), v, key)
            elif key in self.ignored:
                accepts, why = self.ignored[key]
                if accepts is not None and not accepts(value):
                    raise ConfigError(f"{source}: {key}: {value!r} is not supported here; {why}")
            elif self.is_key(key):
                mapped = self.value_maps[key](value) if key in self.value_maps else value
                put(self.resolve(key), mapped, key)
            else:
                unknown.append(key)
        if len(unknown) == 1:
            self.resolve(unknown[0])  # raises with its "did you mean"
        if unknown:
            options = self._options()
            named = ", ".join(f"'{k}'{_suggest(k, options)}" for k in unknown)
            raise ConfigError(f"{source}: unknown {self.label} keys {named}; {self.help_hint}")
        return out

    def top_level(self, data: dict[str, Any] | None) -> dict[str, Any]:
        """``data`` with the tables of other trainers' files (:attr:`key_groups`) opened into it, and
        a section of ours holding another trainer's key (lora-scripts' ``[model]`` has ``v2``)
        split into that key and the rest of the section."""
        out: dict[str, Any] = {}
        for key, value in (data or {}).items():
            key = str(key)
            if isinstance(value, dict) and key not in self.sections and key != self.nested and self.key_groups(key):
                out.update(self.top_level(value))
            elif isinstance(value, dict) and key in self.sections:
                names = {f.name for f in dataclasses.fields(self.sections[key])}
                theirs = {str(k): v for k, v in value.items() if str(k) not in names
                          and (str(k) in self.ignored or str(k) in self.aliases or str(k) in self.expanders)}
                mine = {k: v for k, v in value.items() if str(k) not in theirs}
                if mine or not theirs:
                    out[key] = {**out.get(key, {}), **mine} if isinstance(out.get(key), dict) else mine
                out.update(theirs)
            else:
                out[key] = value
        return out

    def ignored_keys(self, data: dict[str, Any] | None) -> list[str]:
        """The :attr:`ignored` keys in ``data`` (tables opened), one line per reason: "keys: why"."""
        by_reason: dict[str, list[str]] = {}
        for key in self.top_level(data):
            if key in self.ignored:
                by_reason.setdefault(self.ignored[key][1], []).append(key)
        return [f"{', '.join(keys)}: {why}" for why, keys in by_reason.items()]

    def _options(self) -> list[str]:
        paths = self.field_paths()
        return paths + list(self.aliases) + [p.split(".", 1)[1] for p in paths if "." in p]

    def is_key(self, key: str) -> bool:
        """Whether :meth:`resolve` knows ``key``."""
        try:
            self.resolve(key)
        except ConfigError:
            return False
        return True

    def build(self, values: dict[str, Any], base: Any = None) -> Any:
        """A config from {field path or key: value} on top of ``base`` (or the defaults)."""
        data = (base or self.root()).to_dict()
        for key, raw in values.items():
            path = self.resolve(key)
            if key in self.value_maps:
                raw = self.value_maps[key](raw)
            value = check_choices(_coerce(raw, self.type_of(path), path), self.field_info(path), path)
            section, name = _split_path(path)
            if section:
                data[section][name] = value
            else:
                data[name] = value
        return self.root(task=data["task"], **{s: cls(**data[s]) for s, cls in self.sections.items()})

    def parse_set(self, items: list[str]) -> dict[str, Any]:
        """``["network.rank=16", "lora_alpha=8"]`` -> {field_path: value} (values parsed as YAML)."""
        out: dict[str, Any] = {}
        for item in items:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set network.rank=16")
            key, raw = item.split("=", 1)
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
            out.update(self.flatten({key.strip(): value}, source="--set"))
        return out

    def example_yaml(self) -> str:
        """A commented YAML with every key, its default and its help text."""
        defaults = self.root().to_dict()
        lines = [*self.example_header, f"task: {defaults['task']}"]
        for section, cls in self.sections.items():
            lines += ["", f"{section}:"]
            for f in dataclasses.fields(cls):
                value = yaml.safe_dump({f.name: defaults[section][f.name]}, default_flow_style=True,
                                       allow_unicode=True).strip()[1:-1]
                lines += [f"  # {f.metadata.get('help', '')}", f"  {value}"]
        return "\n".join(lines) + "\n"

    def reference_markdown(self) -> str:
        """The key reference table, generated from the help texts."""
        alias_of: dict[str, list[str]] = {}
        for a, p in self.aliases.items():
            alias_of.setdefault(p, []).append(a)
        defaults = self.root().to_dict()
        out = ["| key | default | aliases | what it does |", "|---|---|---|---|"]
        for path in self.field_paths():
            section, name = _split_path(path)
            default = defaults[section][name] if section else defaults[name]
            aliases = ", ".join(f"`{a}`" for a in alias_of.get(path, []))
            out.append(f"| `{path}` | `{default!r}` | {aliases} | {self.field_info(path).metadata.get('help', '')} |")
        if self.ignored:
            by_reason: dict[str, list[str]] = {}
            for key, (_, why) in self.ignored.items():
                by_reason.setdefault(why, []).append(f"`{key}`")
            out += ["", "Keys of other trainers' files that change nothing here are accepted and named in one "
                        "warning; a value this trainer cannot honour is an error:", ""]
            out += [f"- {', '.join(keys)}: {why}" for why, keys in by_reason.items()]
        return "\n".join(out) + "\n"


def _split_path(path: str) -> tuple[str | None, str]:
    if "." in path:
        section, name = path.split(".", 1)
        return section, name
    return None, path

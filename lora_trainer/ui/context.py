"""State shared by the tab's sections while it is built: the field map, the host, the defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lora_trainer.config import TrainConfig
from lora_trainer.errors import LoraTrainerError, one_line
from lora_trainer.ui.fields import config_from_values, make_field, values_from_config

if TYPE_CHECKING:
    from lora_trainer.caption.blip import Captioner
    from lora_trainer.hosts.base import Host


@dataclass
class TabContext:
    host: Host
    prefix: str
    captioner: Captioner | None = None  # overrides the host's own (tests, the standalone app)
    defaults: TrainConfig = field(default_factory=TrainConfig)
    fields: dict[str, Any] = field(default_factory=dict)  # field path -> component
    deferred: list[Any] = field(default_factory=list)
    parts: dict[str, Any] = field(default_factory=dict)  # named non-field components shared by sections
    remember_last_run: bool = False  # a page with no run in this process shows the last run's settings (WebUI)
    start_auto: bool = False  # a page with no run to show starts from the "auto" preset (WebUI)

    def later(self, fn: Any) -> None:
        """Wire an event once every field exists (sections are built in order; handlers that
        rebuild the config need the components of all of them)."""
        self.deferred.append(fn)

    def eid(self, name: str) -> str:
        return f"{self.prefix}{name}"

    @property
    def paths(self) -> list[str]:
        return list(self.fields)

    @property
    def inputs(self) -> list[Any]:
        return [self.fields[p] for p in self.fields]

    def config(self, values: tuple[Any, ...] | list[Any]) -> TrainConfig:
        return config_from_values(self.paths, list(values), base=self.defaults)

    def field(self, path: str, **kw: Any) -> Any:
        kw.setdefault("value", values_from_config(self.defaults, [path])[0])  # a host may show its own
        comp = make_field(path, self.prefix, **kw)
        self.fields[path] = comp
        return comp


def err_text(e: Exception) -> str:
    return f"⚠ {e}" if isinstance(e, LoraTrainerError) else f"⚠ unexpected error: {one_line(e)}"

"""Stand-in for ``modules/shared.py`` (v1.10.1): the loaded model, command-line options, settings."""

from types import SimpleNamespace

from modules import shared_state


class OptionInfo:
    """Like ``modules.options.OptionInfo`` (re-exported by ``shared`` in v1.10.1)."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None,
                 section=None, refresh=None, comment_before="", comment_after="", infotext=None,
                 restrict_api=False, category_id=None):
        self.default, self.label, self.component, self.component_args = default, label, component, component_args
        self.section = section

    def info(self, info):
        self.label += f" ({info})"
        return self


def options_section(section_identifier, options_dict):
    for v in options_dict.values():
        v.section = section_identifier
    return options_dict


class Options:
    def __init__(self) -> None:
        self.data: dict = {}
        self.data_labels: dict = {}

    def add_option(self, key, info) -> None:
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        data = self.__dict__.get("data", {})
        if item in data:
            return data[item]
        labels = self.__dict__.get("data_labels", {})
        if item in labels:
            return labels[item].default
        raise AttributeError(item)


def default_cmd_opts(lora_dir: str = "models/Lora") -> SimpleNamespace:
    return SimpleNamespace(lora_dir=lora_dir, lyco_dir_backcompat=lora_dir, lowvram=False, medvram=False,
                           medvram_sdxl=False, no_half=True, api=True)


cmd_opts = default_cmd_opts()
opts = Options()
state = shared_state.State()
sd_model = None
interrogator = None
device = None
parallel_processing_allowed = True

"""One exception type per kind of user mistake.

Every message is meant for a person: it names the file or field and says what to do. The CLI
prints ``str(error)`` on one line and exits with code 2; library code never calls ``exit()``.
"""

from __future__ import annotations


class LoraTrainerError(Exception):
    """Base class of every error caused by input the user can fix."""


class ConfigError(LoraTrainerError):
    """A config key or value is unknown or invalid."""


class DatasetError(LoraTrainerError):
    """The training folder, captions or images cannot be used."""


class ModelLoadError(LoraTrainerError):
    """A base model, VAE or captioning model cannot be found or read."""


class ModelMissingError(ModelLoadError):
    """Weights that are not on this machine: ``message`` says where to put them, ``cli_option``
    how the command line points elsewhere (a UI says what to do in the UI instead)."""

    def __init__(self, message: str, cli_option: str) -> None:
        super().__init__(f"{message}, or pass {cli_option}")
        self.message, self.cli_option = message, cli_option


class LoraFormatError(LoraTrainerError):
    """A LoRA file or state dict does not match the expected format or model."""


class OutputError(LoraTrainerError):
    """An output name or folder cannot be used."""


class HostError(LoraTrainerError):
    """The host (WebUI or standalone app) cannot do what was asked in its current state."""

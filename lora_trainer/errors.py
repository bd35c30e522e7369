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


class LoraFormatError(LoraTrainerError):
    """A LoRA file or state dict does not match the expected format or model."""


class OutputError(LoraTrainerError):
    """An output name or folder cannot be used."""


class HostError(LoraTrainerError):
    """The host (WebUI or standalone app) cannot do what was asked in its current state."""

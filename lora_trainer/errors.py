"""One exception type per kind of user mistake.

Every message is meant for a person: it names the file or field and says what to do. The CLI
prints ``str(error)`` on one line and exits with code 2; library code never calls ``exit()``.
"""

from __future__ import annotations

import logging


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


class DeviceMemoryError(LoraTrainerError):
    """The GPU (or other accelerator) ran out of memory with the run's settings."""


class HostError(LoraTrainerError):
    """The host (WebUI or standalone app) cannot do what was asked in its current state."""


def one_line(error: BaseException) -> str:
    """What to show a person: the message of a user mistake (written for people already), or the
    type and message of anything else (a bug or the environment) flattened to one line."""
    if isinstance(error, LoraTrainerError):
        return str(error)
    return " ".join(f"{type(error).__name__}: {error}".split())


def report_failure(logger: logging.Logger, what: str, error: BaseException) -> None:
    """Log a failed background job where its host shows logs (the WebUI's console): one line for a
    user mistake, the traceback for anything else. Never raises."""
    try:
        if isinstance(error, LoraTrainerError):
            logger.error("%s failed: %s", what, one_line(error))
        else:
            logger.error("%s failed: %s", what, one_line(error), exc_info=error)
    except Exception:  # noqa: BLE001 - reporting must not turn one failure into two
        pass

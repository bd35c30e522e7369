"""Stand-in for Forge's ``modules`` package: A1111's stand-in (tests/webui_stub/modules) with the
files Forge changed (sd_models, processing) found here first."""

from pathlib import Path

__path__.append(str(Path(__file__).resolve().parents[2] / "webui_stub" / "modules"))

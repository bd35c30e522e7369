"""Which WebUI host this process runs in (Forge or A1111).

Kept apart from ``webui.py``, which both hosts build on, so that no host module is imported by a
module it imports itself.
"""

from __future__ import annotations

from lora_trainer.hosts.webui import WebUIHost, is_forge


def host_for_this_webui() -> WebUIHost:
    """The host for the WebUI this process runs: Forge's when ``modules_forge`` exists, else A1111's."""
    if is_forge():
        from lora_trainer.hosts.forge import ForgeHost

        return ForgeHost()
    from lora_trainer.hosts.a1111 import A1111Host

    return A1111Host()

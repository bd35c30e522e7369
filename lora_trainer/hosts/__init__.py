"""Hosts: where the model comes from and where LoRAs go (standalone, A1111, Forge).

Only ``a1111.py`` and ``forge.py`` may import the WebUI's ``modules`` package, lazily.
"""

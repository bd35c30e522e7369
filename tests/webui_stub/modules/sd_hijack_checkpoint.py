"""Stand-in for ``modules/sd_hijack_checkpoint.py`` (v1.10.1): gradient checkpointing on/off."""

stored: list = []


def add() -> None:
    if not stored:
        stored.append(True)


def remove() -> None:
    stored.clear()

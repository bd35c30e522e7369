"""Stand-in for ``modules.paths`` (v1.10.1): where the WebUI keeps its model folders."""

models_path = ""  # <data dir>/models in the WebUI; tests set it

"""Stand-in for ``modules/sd_models.py`` (v1.10.1): reloading the checkpoint's weights."""

from modules import shared

reloads: list[dict] = []  # test aid


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    reloads.append({"forced_reload": forced_reload})
    reload = getattr(shared.sd_model, "reload_from_checkpoint", None)  # test model hook
    if reload is not None:
        reload()
    return shared.sd_model

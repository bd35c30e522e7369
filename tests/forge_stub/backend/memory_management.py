"""Stand-in for ``backend/memory_management.py`` (Forge Neo): which patchers are loaded, loading
one (its patches are merged into the weights) and unloading (unpatch: the backups come back).

Every model here lives on the CPU (load and offload device), so moves are recorded, not seen.
"""

import torch

current_loaded_models: list = []
events: list[tuple[str, str]] = []  # test aid: ("load"/"unload", model class name)


def get_torch_device() -> torch.device:
    return torch.device("cpu")


class LoadedModel:
    def __init__(self, model) -> None:
        self.model = model  # the patcher (Forge keeps a weakref)
        self.device = model.load_device

    def model_load(self) -> None:
        self.model.patch_model(self.device)
        events.append(("load", type(self.model.model).__name__))

    def model_unload(self, memory_to_free=None, unpatch_weights=True) -> bool:
        self.model.unpatch_model(self.model.offload_device, unpatch_weights=unpatch_weights)
        events.append(("unload", type(self.model.model).__name__))
        return True


def _current(patcher) -> bool:
    return patcher.model.current_weight_patches_uuid == patcher.patches_uuid or (
        not patcher.patches and patcher.model.current_weight_patches_uuid is None)


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False) -> None:
    for patcher in models:
        loaded = next((m for m in current_loaded_models if m.model is patcher), None)
        if loaded is not None and _current(patcher):
            current_loaded_models.remove(loaded)
            current_loaded_models.insert(0, loaded)
            continue
        # The same weights under another patcher (a clone with other LoRAs): unload that first.
        for other in [m for m in current_loaded_models if m.model.is_clone(patcher)]:
            other.model_unload()
            current_loaded_models.remove(other)
        loaded = LoadedModel(patcher)
        loaded.model_load()
        current_loaded_models.insert(0, loaded)


def load_model_gpu(model) -> None:
    load_models_gpu([model])


def free_memory(memory_required, device, keep_loaded=()) -> list:
    unloaded = []
    for m in list(current_loaded_models):
        if m in keep_loaded:
            continue
        m.model_unload()
        current_loaded_models.remove(m)
        unloaded.append(m)
    return unloaded


def unload_all_models() -> None:
    free_memory(1e30, get_torch_device())


def soft_empty_cache(force=False) -> None:
    events.append(("empty_cache", ""))

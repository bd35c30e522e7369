"""Stand-in for ``backend/modules/k_model.py``: ``KModel`` wraps the UNet (``diffusion_model``)."""

import torch


class KModel(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, predictor: torch.nn.Module,
                 computation_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.diffusion_model = model
        self.predictor = predictor
        self.storage_dtype = next(model.parameters()).dtype
        self.computation_dtype = computation_dtype or self.storage_dtype
        self.diffusion_model.eval()
        self.diffusion_model.requires_grad_(False)

"""Stand-in for ``backend/modules/k_prediction.py``: the DDPM schedule of SD1/SDXL models."""

import torch


class Prediction(torch.nn.Module):
    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> None:
        super().__init__()
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())


class PredictionFlux(torch.nn.Module):
    """Flow models: no DDPM schedule (Forge's prediction_type "const")."""

    prediction_type = "const"

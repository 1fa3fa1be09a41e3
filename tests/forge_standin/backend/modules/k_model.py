"""Stand-in of backend/modules/k_model.py and k_prediction.py: KModel.apply_model takes sigma and returns the
denoised x0 (not eps or v); the predictor holds the schedule (`alphas_cumprod`) and `prediction_type`."""

import torch


class Prediction(torch.nn.Module):
    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        self.prediction_type = prediction_type  # "epsilon" or "v_prediction"
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma.log()[:, None] - self.sigmas.log()[None]).abs().argmin(dim=1).float()

    def calculate_input(self, sigma, noise):
        return noise / (sigma**2 + 1).sqrt()[:, None, None, None]

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma[:, None, None, None]
        if self.prediction_type == "v_prediction":
            return model_input / (sigma**2 + 1) - model_output * sigma / (sigma**2 + 1).sqrt()
        return model_input - model_output * sigma


class KModel(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, predictor: Prediction):
        super().__init__()
        self.diffusion_model = model
        self.predictor = predictor
        self.storage_dtype = self.computation_dtype = torch.float32

    def apply_model(self, x, t, c_crossattn=None, **kwargs):
        sigma = t
        xc = self.predictor.calculate_input(sigma, x)
        out = self.diffusion_model(xc, self.predictor.timestep(sigma), context=c_crossattn, transformer_options={})
        return self.predictor.calculate_denoised(sigma, out.float(), x)

"""modules/sd_samplers.py + the k-diffusion CFGDenoiser, reduced to what an extension observes: one
denoiser call per step on a CFG batch [x (cond rows); x (uncond rows)], on_cfg_denoiser fired before it,
shared.state.sampling_step updated after each step (so it lags by one inside the call), Interrupt honoured.

`sample_hook(params)` is the pluggable model call: it gets the CFGDenoiserParams (x, sigma, text_cond,
text_uncond, denoiser with .p and .step) and returns the denoised CFG batch; None means identity. The
update rule is a bare `x = uncond + cfg_scale * (cond - uncond)`; no real sampler is implemented."""
import torch

from modules import script_callbacks
from modules.shared import state

sample_hook = None


class InterruptedException(BaseException):
    pass


class CFGDenoiser:
    def __init__(self, sampler):
        self.sampler = sampler
        self.p = None
        self.step = 0
        self.steps = None
        self.total_steps = None

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if state.interrupted or state.skipped:
            raise InterruptedException
        x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        params = script_callbacks.CFGDenoiserParams(x_in, image_cond, sigma_in, state.sampling_step, state.sampling_steps, cond, uncond, self)
        script_callbacks.cfg_denoiser_callback(params)
        x_out = params.x if sample_hook is None else sample_hook(params)
        self.step += 1
        denoised_cond, denoised_uncond = x_out[:x.shape[0]], x_out[x.shape[0]:]
        return denoised_uncond + (denoised_cond - denoised_uncond) * cond_scale


class Sampler:
    def __init__(self, name, sd_model):
        self.name = name
        self.model_wrap_cfg = CFGDenoiser(self)
        self.p = None
        self.last_latent = None

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = self.model_wrap_cfg.total_steps = steps
        state.sampling_steps = steps
        state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent

    def _run(self, p, x, conditioning, unconditional_conditioning, steps, image_conditioning):
        self.p = self.model_wrap_cfg.p = p
        self.last_latent = x
        for i in range(steps):
            sigma = torch.full((x.shape[0],), float(steps - i))
            x = self.last_latent = self.model_wrap_cfg.forward(x, sigma, unconditional_conditioning, conditioning, p.cfg_scale, 0.0, image_conditioning)
            state.sampling_step = i  # the k-diffusion callback runs after the step
        return x

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        return self.launch_sampling(steps, lambda: self._run(p, x, conditioning, unconditional_conditioning, steps, image_conditioning))

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        return self.launch_sampling(t_enc + 1, lambda: self._run(p, x + noise, conditioning, unconditional_conditioning, t_enc + 1, image_conditioning))


def create_sampler(name, model):
    return Sampler(name, model)

"""Stand-in of Forge Neo's backend/diffusion_engine/sd15.py over the tests' tiny model: `forge_objects` (U-Net
patcher whose KModel wraps the U-Net, CLIP, VAE), one text engine, and the conditioning and VAE entry points
decorated with torch.inference_mode as Neo's are. Built the way Neo's loader builds a model: the weights loaded
under inference mode (`memory_management.load_model_gpu`), the U-Net's transformer blocks adding in place."""

import torch

from backend import memory_management
from backend.modules.k_model import KModel, Prediction
from backend.nn.unet import neo_blocks
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher
from backend.text_processing.classic_engine import ClassicTextProcessingEngine


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class CLIPTextModel(torch.nn.Module):
    """transformers 4's layout (`.text_model.embeddings`; Neo pins 4.56) over whichever is installed (5 flattens
    CLIPTextModel)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def text_model(self):
        return getattr(self.model, "text_model", self.model)

    def forward(self, input_ids, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)


class IntegratedCLIP(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = CLIPTextModel(transformer)


class VAE:
    def __init__(self, encode, decode):
        self.encode, self.decode = encode, decode
        self.first_stage_model = torch.nn.Linear(1, 1)  # where the VAE's weights would live (vae_on moves it)


class ForgeDiffusionEngine:
    """backend/diffusion_engine/base.py with what each engine repeats: the VAE entry points under
    inference_mode and the loads its loader makes (so the weights start as inference tensors)."""

    def __init__(self, unet, clip, vae, model_hash):
        self.forge_objects = ForgeObjects(unet, clip, vae)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.sd_model_hash = model_hash
        memory_management.load_model_gpu(unet)
        memory_management.load_model_gpu(clip.patcher)

    @property
    def first_stage_model(self):
        return self.forge_objects.vae.first_stage_model

    @torch.inference_mode()
    def encode_first_stage(self, x):
        return self.forge_objects.vae.encode(x)

    @torch.inference_mode()
    def decode_first_stage(self, x):
        return self.forge_objects.vae.decode(x)

    def get_first_stage_encoding(self, x):
        return x


class StableDiffusion(ForgeDiffusionEngine):
    def __init__(self, adapter):
        prediction = "v_prediction" if adapter.prediction == "v" else "epsilon"
        neo_blocks(adapter.diffusion_model)
        unet = UnetPatcher(KModel(adapter.diffusion_model, Prediction(adapter.alphas_cumprod, prediction)))
        clip = CLIP({"clip_l": IntegratedCLIP(adapter.text_encoder)})
        self.text_processing_engine = ClassicTextProcessingEngine(
            clip.cond_stage_model.clip_l, adapter.tokenizer, embedding_expected_shape=adapter.context_dim
        )
        super().__init__(unet, clip, VAE(*adapter.first_stage), "neo00000")
        self.is_sd1, self.is_sdxl = True, False

    def set_clip_skip(self, clip_skip):
        self.text_processing_engine.clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        return self.text_processing_engine(prompt)

"""Stand-in of Forge Neo's backend/diffusion_engine/sdxl.py over the tests' SDXL-shaped parts: two text engines
(clip_l 768, clip_g 1280 with the pooled projection; penultimate layer, no final norm), `get_learned_conditioning`
under torch.inference_mode returning {"crossattn": [B, 77k, 2048], "vector": [B, pooled + 6 size features]} with
the sizes of the prompt list's width/height, and the U-Net taking that vector as `y`."""

import torch
from ldm.modules.diffusionmodules.util import timestep_embedding

from backend import memory_management
from backend.diffusion_engine.sd15 import VAE, ForgeDiffusionEngine, IntegratedCLIP
from backend.modules.k_model import KModel, Prediction
from backend.nn.unet import neo_blocks
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher
from backend.text_processing.classic_engine import ClassicTextProcessingEngine


class StableDiffusionXL(ForgeDiffusionEngine):
    def __init__(self, clip_l, clip_g, unet, adapter, size_features: int):
        neo_blocks(unet)
        self.size_features = size_features
        patcher = UnetPatcher(KModel(unet, Prediction(adapter.alphas_cumprod, "epsilon")))
        clip = CLIP({"clip_l": IntegratedCLIP(clip_l), "clip_g": IntegratedCLIP(clip_g)})
        engine = dict(embedding_expected_shape=2048, minimal_clip_skip=2, clip_skip=2, final_layer_norm=False)
        self.text_processing_engine_l = ClassicTextProcessingEngine(
            clip.cond_stage_model.clip_l, adapter.tokenizer, "clip_l", **engine
        )
        self.text_processing_engine_g = ClassicTextProcessingEngine(
            clip.cond_stage_model.clip_g, adapter.tokenizer, "clip_g", return_pooled=True, **engine
        )
        super().__init__(patcher, clip, VAE(*adapter.first_stage), "neoxl000")
        self.is_sd1, self.is_sdxl = False, True

    def set_clip_skip(self, clip_skip):
        self.text_processing_engine_l.clip_skip = clip_skip
        self.text_processing_engine_g.clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        cond_l = self.text_processing_engine_l(prompt)
        cond_g, pooled = self.text_processing_engine_g(prompt)
        width = getattr(prompt, "width", 1024) or 1024
        height = getattr(prompt, "height", 1024) or 1024
        sizes = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
        flat = timestep_embedding(sizes, self.size_features).flatten()[None].repeat(pooled.shape[0], 1)
        return {"crossattn": torch.cat([cond_l, cond_g], dim=2), "vector": torch.cat([pooled, flat.to(pooled)], 1)}

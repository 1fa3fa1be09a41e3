"""An SDXL-shaped model for the WebUI stand-in: what v1.10.1's SDXL DiffusionEngine offers an extension.

`conditioner.embedders` holds two text embedders (clip_l 768 wide, clip_g 1280 wide, real CLIP
tokenizer, the WebUI's 75-token chunks and textual-inversion fixes, each taking its own key of an
SDXL embedding dict), both giving their penultimate layer's rows; clip_g also gives the pooled EOS
projection. `get_learned_conditioning` returns {"crossattn": [B, 77k, 2048], "vector": [B, 1280 + 48]}
(pooled clip_g + embeddings of original size, crop and target size), and `apply_model(x, t, cond)`
runs the ldm UNetModel with `y=cond["vector"]` added to its timestep embedding, as SDXL's U-Net does.
Small where the format allows (one CLIP layer, narrow MLPs, a small U-Net).
"""

from __future__ import annotations

import torch
import webui_host as host
from ldm.modules.diffusionmodules.util import timestep_embedding
from models import BOS_ID, EOS_ID, MAX_LENGTH, VOCAB_SIZE, small_unet
from modules import sd_models
from tiny import tiny_adapter
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

SIZE_FEATURES = 8  # per size number (the real model uses 256)
VECTOR = 1280 + 6 * SIZE_FEATURES


def clip(hidden: int, seed: int) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=64,
        projection_dim=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="gelu",
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval().requires_grad_(False)


class TinySDXLTextEmbedder(host.TinyCondStage):
    """FrozenCLIPEmbedderForSDXLWithCustomWords / FrozenOpenCLIPEmbedder2WithCustomWords reduced to their
    contract. forward(texts) -> (rows [B, 77k, width], pooled [B, width] of the first chunk)."""

    def __init__(self, adapter, key: str, hidden: int, seed: int):
        super().__init__(adapter)
        self.key, self.encoder = key, clip(hidden, seed)
        self.token_embedding = self.encoder.get_input_embeddings()
        self.token_embedding.register_forward_hook(self._fix)
        self._fixes = None

    def _fix(self, module, args, out):
        if self._fixes is None:
            return None
        where, rows = self._fixes
        out = out.clone()
        out[where] = rows.to(out.dtype)
        return out

    def encode_embedding_init_text(self, init_text, nvpt):
        ids = torch.tensor(self.tokenize([init_text])[0][:nvpt])
        return self.token_embedding(ids)

    def forward(self, texts):
        rows, pooled = [], []
        for text in texts:
            chunks, _ = self.tokenize_line(text)
            ids = torch.tensor([c.tokens for c in chunks])
            where, vectors = torch.zeros(ids.shape, dtype=torch.bool), []
            for k, c in enumerate(chunks):
                for fix in c.fixes:
                    n = int(fix.embedding.vectors)
                    where[k, fix.offset + 1 : fix.offset + 1 + n] = True
                    vectors.append(fix.embedding.vec[self.key][:n])
            self._fixes = (where, torch.cat(vectors)) if vectors else None
            try:
                out = self.encoder(input_ids=ids, output_hidden_states=True)
            finally:
                self._fixes = None
            rows.append(out.hidden_states[-2].reshape(1, -1, self.encoder.config.hidden_size))
            pooled.append(out.text_embeds[:1])
        return torch.cat(rows), torch.cat(pooled)


class TinyConditioner(nn.Module):
    """sgm's GeneralConditioner with the WebUI's additions (tokenize, encode_embedding_init_text)."""

    def __init__(self, adapter, seed: int):
        super().__init__()
        self.embedders = nn.ModuleList(
            [
                TinySDXLTextEmbedder(adapter, "clip_l", 768, seed),
                TinySDXLTextEmbedder(adapter, "clip_g", 1280, seed + 1),
            ]
        )

    def tokenize(self, texts):
        return self.embedders[0].tokenize(texts)

    def encode_embedding_init_text(self, init_text, nvpt):
        return torch.cat([e.encode_embedding_init_text(init_text, nvpt) for e in self.embedders], dim=1)

    def forward(self, batch: dict) -> dict:
        (l_rows, _), (g_rows, pooled) = (e(list(batch["txt"])) for e in self.embedders)
        sizes = torch.cat(
            [batch["original_size_as_tuple"], batch["crop_coords_top_left"], batch["target_size_as_tuple"]], 1
        )
        size_features = timestep_embedding(sizes.flatten(), SIZE_FEATURES).reshape(sizes.shape[0], -1)
        return {"crossattn": torch.cat([l_rows, g_rows], -1), "vector": torch.cat([pooled, size_features], -1)}


class TinySDXLModel(nn.Module):
    is_sdxl = True

    def __init__(self, seed: int = 0):
        super().__init__()
        self.adapter = tiny_adapter(prediction="eps", seed=seed)  # its tokenizer, schedule and first stage
        self.conditioner = TinyConditioner(self.adapter, seed)
        self.cond_stage_model = self.conditioner  # as the WebUI's hijack sets it for two text encoders
        self.model = nn.Module()
        unet = small_unet(2048, seed=seed).requires_grad_(False)
        unet.num_classes = "sequential"
        torch.manual_seed(seed)
        unet.label_emb = nn.Sequential(nn.Linear(VECTOR, 128), nn.SiLU(), nn.Linear(128, 128)).requires_grad_(False)
        self.model.diffusion_model = unet
        self.first_stage_model = host.VaePlacement()
        self.alphas_cumprod = self.adapter.alphas_cumprod.float()
        self.parameterization = "eps"
        self.vectors = []  # every `vector` the U-Net received (to see it reach the model)

    def get_learned_conditioning(self, batch):
        width = getattr(batch, "width", 1024) or 1024
        height = getattr(batch, "height", 1024) or 1024
        n = len(batch)
        return self.conditioner(
            {
                "txt": batch,
                "original_size_as_tuple": torch.tensor([[height, width]] * n, dtype=torch.float32),
                "crop_coords_top_left": torch.zeros(n, 2),
                "target_size_as_tuple": torch.tensor([[height, width]] * n, dtype=torch.float32),
            }
        )

    def apply_model(self, x, t, cond):
        self.vectors.append(cond["vector"].detach())
        return self.model.diffusion_model(x, t, context=cond["crossattn"], y=cond["vector"])

    def encode_first_stage(self, images):
        return self.adapter.encode_images(images)

    def get_first_stage_encoding(self, encoded):
        return encoded

    def decode_first_stage(self, latents):
        return self.adapter.decode_latents(latents)


def load_sdxl_model(seed: int = 0) -> TinySDXLModel:
    sd_models.instantiate_from_config = lambda config, state_dict=None: TinySDXLModel(seed)
    return sd_models.load_model(sd_models.CheckpointInfo("sdxl.safetensors"))

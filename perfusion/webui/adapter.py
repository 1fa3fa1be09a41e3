"""The engine's Adapter over the model the WebUI has loaded (A1111 SD1.x / SD2.x / SDXL), for training in the WebUI.

Text goes through the WebUI's own conditioning path (`cond_stage_model(texts)`: CLIP skip, emphasis,
chunks of 75 tokens) with the concept's embedding registered as a textual-inversion vector, as the
WebUI's own embedding training does, so gradients reach the embedding and the encodings are the ones
generation will see. Rows come from the same tokenizer (`tokenize_line`): an embedding's vectors
sit at chunk * 77 + fix offset + 1 + j.

SDXL: the conditioner's two text encoders (clip_l, clip_g) each take their half of the embedding; the
context is the cross-attention rows [B, 77k, 2048] carrying SDXL's `vector` (pooled clip_g + size
embedding, at the training resolution) for the U-Net. The refiner (clip_g only) is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Optional

import torch
from modules import devices

from ..adapter import Embedding
from ..diffusion import pooled, with_pooled
from ..hooks import find_cross_attention
from ..tokens import concept_rows
from . import host

SDXL_ENCODERS = ("clip_l", "clip_g")  # the order of the text embedders in SDXL's conditioner


class WebUIAdapter:
    """Adapter for `shared.sd_model`: LatentDiffusion with a FrozenCLIPEmbedderWithCustomWords-style
    cond_stage_model, or SDXL's DiffusionEngine whose conditioner holds clip_l and clip_g."""

    def __init__(self, sd_model: Any, resolution: int = 1024):
        self.sd_model = sd_model
        self.sdxl = hasattr(sd_model, "conditioner")
        self.resolution = resolution  # SDXL's size conditioning (original and target size)
        if self.sdxl:
            self.encoders = [e for e in sd_model.conditioner.embedders if hasattr(e, "tokenize_line")]
            if len(self.encoders) != len(SDXL_ENCODERS):
                raise NotImplementedError(
                    "this SDXL model has one text encoder (the refiner?); train on the SDXL "
                    "base model, which has clip_l and clip_g"
                )
        else:
            self.encoders = [sd_model.cond_stage_model]
        self.diffusion_model = host.diffusion_model(sd_model)
        self.alphas_cumprod = sd_model.alphas_cumprod.detach().double().cpu()
        self.prediction = "v" if getattr(sd_model, "parameterization", "eps") == "v" else "eps"
        self._describe()

    def _describe(self) -> None:
        """context_dim, arch and model_hash, read from the U-Net found and the WebUI's model."""
        self.context_dim = next(iter(find_cross_attention(self.diffusion_model).values())).to_k.in_features
        self.arch = "sdxl" if self.sdxl else {768: "sd1", 1024: "sd2"}.get(self.context_dim, "other")
        self.model_hash = str(getattr(self.sd_model, "sd_model_hash", "") or "")

    @property
    def encoder_hash(self) -> str:
        """What the text-encoding covariance is cached under: the WebUI's model hash, or (when the WebUI has
        none, e.g. a checkpoint loaded without hashing) a fingerprint of the model's own weights (text encoders
        and U-Net, a sample of each tensor), so two models never share one covariance."""
        if self.model_hash:
            return self.model_hash
        h = hashlib.sha256()
        for module in (*self.encoders, self.diffusion_model):
            for name, tensor in module.state_dict().items():
                h.update(name.encode())
                h.update(tensor.detach().float().flatten()[:4096].cpu().numpy().tobytes())
        return "weights-" + h.hexdigest()[:12]

    @property
    def device(self) -> torch.device:
        return next(self.diffusion_model.parameters()).device

    @property
    def text(self) -> Any:
        return prompt_tokenizer(self.sd_model)

    def token_count(self, word: str) -> int:
        return len(self.text.tokenize([word])[0])

    def word_embedding(self, word: str) -> Embedding:
        n = self.token_count(word)
        keys = SDXL_ENCODERS if self.sdxl else ("",)
        return {
            key: encoder.encode_embedding_init_text(word, n).detach().float().clone()
            for key, encoder in zip(keys, self.encoders)
        }

    def _autocast(self) -> AbstractContextManager:
        return devices.autocast()  # as the WebUI trains: fp16 weights, fp32 concept tensors

    def _condition(self, prompts: list[str], size: tuple[int, int]) -> torch.Tensor:
        """The WebUI's conditioning of `prompts`: rows [B, N, d] (SDXL: carrying its pooled vector [B, k], whose
        size conditioning says `size`, (width, height) px)."""
        if not self.sdxl:
            return self.sd_model.cond_stage_model(list(prompts))
        from modules.prompt_parser import SdConditioning

        cond = self.sd_model.get_learned_conditioning(SdConditioning(prompts, width=size[0], height=size[1]))
        return with_pooled(cond["crossattn"], cond["vector"])

    def encode(
        self,
        prompts: list[str],
        words: Optional[Mapping[str, Optional[Embedding]]] = None,
        size: Optional[tuple[int, int]] = None,
    ) -> tuple[torch.Tensor, dict[str, list[list[int]]]]:
        words = dict(words or {})
        replaced = []
        try:
            for word, emb in words.items():
                if emb is not None:  # the tensors themselves (not copies): gradients reach them
                    vec = emb[""] if set(emb) == {""} else dict(emb)
                    replaced += host.register_word(self.sd_model, word, vec, host.embedding_size(emb))
            with self._autocast():
                context = self._condition(list(prompts), size or (self.resolution, self.resolution))
            rows = {
                word: [word_rows_in(self.text, prompt, word, words[word] is not None) for prompt in prompts]
                for word in words
            }
        finally:
            host.restore_words(self.sd_model, replaced)
        return context, rows

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        cond = {"crossattn": context, "vector": pooled(context)} if self.sdxl else context
        with devices.autocast():
            return self.sd_model.apply_model(x, t, cond)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        m = self.sd_model
        return m.get_first_stage_encoding(m.encode_first_stage(images.to(self.device)))

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """(C, h, w) of the latents of a resolution x resolution image (one VAE encode of a grey image)."""
        with torch.no_grad():
            return tuple(self.encode_images(torch.zeros(1, 3, resolution, resolution)).shape[1:])

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.sd_model.decode_first_stage(latents)


def prompt_tokenizer(sd_model: Any) -> Any:
    """The text encoder whose tokenizer places a prompt's context rows: Forge's first text engine, SDXL's clip_l
    embedder (clip_g tokenizes alike), else the cond stage model."""
    if host.forge_backend():
        return host.text_engines(sd_model)[0]
    if hasattr(sd_model, "conditioner"):
        return next(e for e in sd_model.conditioner.embedders if hasattr(e, "tokenize_line"))
    return sd_model.cond_stage_model


def word_rows_in(tokenizer: Any, prompt: str, word: str, is_embedding: bool) -> list[int]:
    """The last context row of each occurrence of `word` in `prompt`, as `tokenizer` (prompt_tokenizer) places it;
    is_embedding: the word is a registered textual-inversion embedding."""
    chunks, _ = tokenizer.tokenize_line(prompt)
    length = len(chunks[0].tokens) if chunks else 77
    if is_embedding:
        return [
            k * length + fix.offset + int(fix.embedding.vectors)
            for k, chunk in enumerate(chunks)
            for fix in chunk.fixes
            if fix.embedding.name == word
        ]
    return concept_rows([c.tokens for c in chunks], tokenizer.tokenize([word])[0], length)


def adapter_for(sd_model: Any, resolution: int = 1024) -> WebUIAdapter:
    """The training Adapter for the loaded model: over Forge's backend (Forge, Neo) or A1111's ldm/sgm (A1111,
    reForge)."""
    if host.forge_backend():
        from .backend_adapter import BackendAdapter

        return BackendAdapter(sd_model, resolution)
    return WebUIAdapter(sd_model, resolution)

"""The engine's Adapter over the model the WebUI has loaded (A1111 SD1.x / SD2.x), for training in the WebUI.

Text goes through the WebUI's own conditioning path (`cond_stage_model(texts)`: CLIP skip, emphasis,
chunks of 75 tokens) with the concept's embedding registered as a textual-inversion vector, as the
WebUI's own embedding training does, so gradients reach the embedding and the encodings are the ones
generation will see. Rows come from the same tokenizer (`tokenize_line`): an embedding's vectors
sit at chunk * 77 + fix offset + 1 + j.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from modules import devices

from ..adapter import Embedding
from ..hooks import find_cross_attention
from ..tokens import word_rows
from . import host


class WebUIAdapter:
    """Adapter for `shared.sd_model` (LatentDiffusion with a FrozenCLIPEmbedderWithCustomWords-style
    cond_stage_model). SDXL is refused here with a clear message."""

    def __init__(self, sd_model: Any):
        if getattr(sd_model, "is_sdxl", False) or hasattr(sd_model, "conditioner"):
            raise NotImplementedError("training on SDXL is not supported yet; load an SD1.x or SD2.x model")
        self.sd_model = sd_model
        self.diffusion_model = host.diffusion_model(sd_model)
        self.alphas_cumprod = sd_model.alphas_cumprod.detach().double().cpu()
        self.prediction = "v" if getattr(sd_model, "parameterization", "eps") == "v" else "eps"
        self.context_dim = next(iter(find_cross_attention(self.diffusion_model).values())).to_k.in_features
        self.arch = {768: "sd1", 1024: "sd2"}.get(self.context_dim, "other")
        self.model_hash = str(getattr(sd_model, "sd_model_hash", "") or "")

    @property
    def device(self) -> torch.device:
        return next(self.diffusion_model.parameters()).device

    @property
    def text(self) -> Any:
        return self.sd_model.cond_stage_model

    def token_count(self, word: str) -> int:
        return len(self.text.tokenize([word])[0])

    def word_embedding(self, word: str) -> Embedding:
        n = self.token_count(word)
        return {"": self.text.encode_embedding_init_text(word, n).detach().float().clone()}

    def encode(self, prompts: list[str], words: Optional[Mapping[str, Optional[Embedding]]] = None
               ) -> tuple[torch.Tensor, dict[str, list[list[int]]]]:
        words = dict(words or {})
        replaced = []
        try:
            for word, emb in words.items():
                if emb is not None:  # the tensor itself (not a copy): gradients reach it
                    replaced += host.register_word(self.sd_model, word, emb[""], host.embedding_size(emb))
            with devices.autocast():  # as the WebUI trains: fp16 weights, fp32 concept tensors
                context = self.text(list(prompts))
            rows = {word: [self._rows(prompt, word, words[word] is not None) for prompt in prompts] for word in words}
        finally:
            host.restore_words(self.sd_model, replaced)
        return context, rows

    def _rows(self, prompt: str, word: str, is_embedding: bool) -> list[int]:
        """The last context row of each occurrence of `word` in `prompt` (as the encoder saw it)."""
        chunks, _ = self.text.tokenize_line(prompt)
        length = len(chunks[0].tokens) if chunks else 77
        if is_embedding:
            return [k * length + fix.offset + int(fix.embedding.vectors)
                    for k, chunk in enumerate(chunks) for fix in chunk.fixes if fix.embedding.name == word]
        ids = self.text.tokenize([word])[0]
        return [rows[-1] for rows in word_rows([c.tokens for c in chunks], ids, length)]

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        with devices.autocast():
            return self.sd_model.apply_model(x, t, context)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        m = self.sd_model
        return m.get_first_stage_encoding(m.encode_first_stage(images.to(self.device)))

    def latent_shape(self, resolution: int) -> tuple[int, ...]:
        """(C, h, w) of the latents of a resolution x resolution image (one VAE encode of a grey image)."""
        with torch.no_grad():
            return tuple(self.encode_images(torch.zeros(1, 3, resolution, resolution)).shape[1:])

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.sd_model.decode_first_stage(latents)

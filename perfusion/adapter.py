"""The small protocol the trainer, sampler and report use to talk to a text-to-image model.

The WebUI, the miniature model and the tests each provide one; the engine never looks further.
`LdmClipAdapter` serves any ldm UNetModel paired with a transformers CLIPTextModel.
"""
from __future__ import annotations

import re
from typing import Callable, Optional, Protocol

import torch
from torch import nn

from .tokens import CLIP_BOS, CLIP_EOS

Embedding = dict[str, torch.Tensor]  # {"" or "clip_l"/"clip_g": [n, d_emb]}


class Adapter(Protocol):
    """What a host model offers the engine.

    context_dim: width of the context rows; prediction: "eps" or "v"; alphas_cumprod: [T] on CPU.
    """

    context_dim: int
    prediction: str
    alphas_cumprod: torch.Tensor
    diffusion_model: nn.Module
    device: torch.device
    arch: str

    def token_count(self, word: str) -> int:
        """Number of tokens `word` becomes."""

    def word_embedding(self, word: str) -> Embedding:
        """The raw input-embedding rows of `word`."""

    def encode(self, prompts: list[str], word: Optional[str] = None, embedding: Optional[Embedding] = None
               ) -> tuple[torch.Tensor, list[list[int]]]:
        """Context [B, N, d] for `prompts` in which `word` (if any) appears; where `embedding` is given the word's
        tokens are replaced by its n vectors (gradients reach them). Also the word's context rows per
        prompt: the last row of each occurrence."""

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The denoiser's prediction (eps or v per `prediction`) for x [B, C, h, w] at integer steps t [B]."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] of images [B, 3, R, R] in [-1, 1]."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] in [-1, 1]."""


def _split_on_word(prompt: str, word: str) -> list[str]:
    """Pieces of `prompt` around each whole-word occurrence of `word` (case-insensitive)."""
    return re.split(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, flags=re.IGNORECASE)


class LdmClipAdapter:
    """An ldm UNetModel + a transformers CLIPTextModel (and tokenizer), one 77-row chunk per prompt.

    first_stage: optional (encode, decode) pair between images and latents; pixel space if None.
    """

    arch = "other"

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, tokenizer, alphas_cumprod: torch.Tensor,
                 prediction: str = "eps", first_stage: Optional[tuple[Callable, Callable]] = None,
                 model_hash: str = ""):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.diffusion_model, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.alphas_cumprod = alphas_cumprod.detach().double().cpu()
        self.prediction, self.first_stage, self.model_hash = prediction, first_stage, model_hash
        self.context_dim = text_encoder.config.hidden_size
        self._token_embedding = text_encoder.get_input_embeddings()
        self._replacement = None  # (mask [B, 77] bool, rows [k, d]) while encoding with an embedding
        self._token_embedding.register_forward_hook(self._replace_rows)

    @property
    def device(self) -> torch.device:
        return next(self.diffusion_model.parameters()).device

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []

    def token_count(self, word: str) -> int:
        return len(self._ids(word))

    def word_embedding(self, word: str) -> Embedding:
        ids = torch.tensor(self._ids(word), device=self._token_embedding.weight.device)
        return {"": self._token_embedding(ids).detach().clone()}

    def _replace_rows(self, module, args, out):
        if self._replacement is None:
            return None
        mask, rows = self._replacement
        out = out.clone()
        out[mask] = rows.to(out.dtype)
        return out

    def encode(self, prompts, word=None, embedding=None):
        word_ids = self._ids(word) if word else []
        n = embedding[""].shape[0] if embedding is not None else len(word_ids)
        batch, masks, rows = [], [], []
        for prompt in prompts:
            ids, mask, found = [CLIP_BOS], [False], []
            for k, piece in enumerate(_split_on_word(prompt, word) if word else [prompt]):
                if k:
                    ids += word_ids if embedding is None else [CLIP_EOS] * n
                    mask += [embedding is not None] * n
                    found.append(len(ids) - 1)
                ids += self._ids(piece)
                mask += [False] * (len(ids) - len(mask))
            if len(ids) > 76:
                raise ValueError(f"prompt is longer than 75 tokens: {prompt!r}")
            pad = 77 - len(ids)
            batch.append(ids + [CLIP_EOS] * pad)
            masks.append(mask + [False] * pad)
            rows.append(found)
        ids = torch.tensor(batch, device=self._token_embedding.weight.device)
        if embedding is not None:
            mask = torch.tensor(masks, device=ids.device)
            self._replacement = (mask, embedding[""].repeat(int(mask.sum()) // n, 1))
        try:
            context = self.text_encoder(input_ids=ids).last_hidden_state
        finally:
            self._replacement = None
        return context, rows

    def apply_model(self, x, t, context):
        return self.diffusion_model(x, t, context=context)

    def encode_images(self, images):
        return images if self.first_stage is None else self.first_stage[0](images)

    def decode_latents(self, latents):
        return latents if self.first_stage is None else self.first_stage[1](latents)

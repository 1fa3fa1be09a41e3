"""The small protocol the trainer, sampler and report use to talk to a text-to-image model.

The WebUI, the miniature model and the tests each provide one; the engine never looks further.
`LdmClipAdapter` serves any ldm UNetModel paired with a transformers CLIPTextModel.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Optional, Protocol

import torch
from torch import nn

from .dataset import by_size
from .tokens import CLIP_BOS, CLIP_EOS

Embedding = dict[str, torch.Tensor]  # {"" or "clip_l"/"clip_g": [n, d_emb]}


def concept_words(concepts) -> dict[str, Optional[Embedding]]:
    """{word: learned embedding} for Perfusion concepts, {class word: None} for Infusion ones."""
    return {c.token: (c.embedding if c.method == "perfusion" else None) for c in concepts}


class Adapter(Protocol):
    """What a host model offers the engine.

    context_dim: width of the context rows; prediction: "eps" or "v"; alphas_cumprod: [T] on CPU.
    A U-Net that also takes one vector per prompt (SDXL: pooled text + size embedding) gets it from
    the context (diffusion.with_pooled / pooled: [B, k]), which encode attaches and the engine keeps with the
    rows (join_contexts).
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

    def encode(
        self,
        prompts: list[str],
        words: Optional[Mapping[str, Optional[Embedding]]] = None,
        size: Optional[tuple[int, int]] = None,
    ) -> tuple[torch.Tensor, dict[str, list[list[int]]]]:
        """Context [B, N, d] for `prompts`, and for every word of `words` its context rows in each prompt
        (the last row of each occurrence). A word mapped to an embedding has its tokens replaced by the
        embedding's n vectors (gradients reach them); a word mapped to None keeps its own tokens. size:
        (width, height) px of the images the prompts go with, for a model conditioned on it (SDXL)."""

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The denoiser's prediction (eps or v per `prediction`) for x [B, C, h, w] at integer steps t [B]."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] of images [B, 3, H, W] in [-1, 1]."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1]."""


def encode_by_size(adapter: Adapter, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Latents [C, h, w] (float32, on the adapter's device) of each image [3, H, W]; one VAE batch per size."""
    latents: list[torch.Tensor] = [torch.empty(0)] * len(images)
    for idx in by_size(images).values():
        batch = torch.stack([images[i] for i in idx]).to(adapter.device)
        for i, z in zip(idx, adapter.encode_images(batch).float()):
            latents[i] = z
    return latents


def _split_on_words(prompt: str, words: list[str]) -> list[str]:
    """[text, word, text, word, ..., text]: `prompt` cut at whole-word occurrences of `words` (any case)."""
    if not words:
        return [prompt]
    pattern = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.split(rf"(?<!\w)({pattern})(?!\w)", prompt, flags=re.IGNORECASE)


def padding_mask(lengths: torch.Tensor, rows: int) -> torch.Tensor:
    """[B, rows, 1]: 1 on each prompt's BOS, tokens and EOS (its first `lengths` + 1 rows), 0 on the padding."""
    return (torch.arange(rows, device=lengths.device)[None, :] <= lengths[:, None]).unsqueeze(-1).float()


class LdmClipAdapter:
    """An ldm UNetModel + a transformers CLIPTextModel (and tokenizer), one chunk per prompt of the encoder's
    max_position_embeddings rows (77 for CLIP: BOS, up to 75 tokens, EOS and padding).

    first_stage: optional (encode, decode) pair between images and latents; pixel space if None.
    zero_padding: rows after each prompt's EOS become zeros (a model trained that way reads only its words;
    Stable Diffusion feeds the padding's encodings, the default).
    """

    arch = "other"

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        tokenizer,
        alphas_cumprod: torch.Tensor,
        prediction: str = "eps",
        first_stage: Optional[tuple[Callable, Callable]] = None,
        model_hash: str = "",
        zero_padding: bool = False,
    ):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.diffusion_model, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.alphas_cumprod = alphas_cumprod.detach().double().cpu()
        self.prediction, self.first_stage, self.model_hash = prediction, first_stage, model_hash
        self.zero_padding = zero_padding
        self.context_dim = text_encoder.config.hidden_size
        self.chunk_length = text_encoder.config.max_position_embeddings
        self._token_embedding = text_encoder.get_input_embeddings()
        self._replacement = None  # (mask [B, chunk_length] bool, rows [k, d]) while encoding with an embedding
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

    def encode(self, prompts, words=None, size=None):  # size: no size conditioning here
        words = dict(words or {})
        canonical = {w.lower(): w for w in words}
        ids_of = {w: self._ids(w) for w in words}
        batch, vectors, mask, rows, lengths = [], [], [], {w: [] for w in words}, []
        for prompt in prompts:
            ids, found = [CLIP_BOS], {w: [] for w in words}
            for k, piece in enumerate(_split_on_words(prompt, list(words))):
                if k % 2 == 0:
                    ids += self._ids(piece)
                    continue
                word = canonical[piece.lower()]
                emb = words[word]
                if emb is None:
                    ids += ids_of[word]
                else:
                    mask += [(len(batch), len(ids) + j) for j in range(emb[""].shape[0])]
                    vectors.append(emb[""])
                    ids += [CLIP_EOS] * emb[""].shape[0]
                found[word].append(len(ids) - 1)
            if len(ids) > self.chunk_length - 1:
                raise ValueError(f"prompt is longer than {self.chunk_length - 2} tokens: {prompt!r}")
            lengths.append(len(ids))
            batch.append(ids + [CLIP_EOS] * (self.chunk_length - len(ids)))
            for w in words:
                rows[w].append(found[w])
        ids = torch.tensor(batch, device=self._token_embedding.weight.device)
        if vectors:
            where = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
            where[tuple(torch.tensor(mask, device=ids.device).T)] = True
            self._replacement = (where, torch.cat(vectors))
        try:
            context = self.text_encoder(input_ids=ids).last_hidden_state
        finally:
            self._replacement = None
        if self.zero_padding:
            context = context * padding_mask(torch.tensor(lengths, device=ids.device), ids.shape[1]).to(context.dtype)
        return context, rows

    def apply_model(self, x, t, context):
        return self.diffusion_model(x, t, context=context)

    def encode_images(self, images):
        return images if self.first_stage is None else self.first_stage[0](images)

    def decode_latents(self, latents):
        return latents if self.first_stage is None else self.first_stage[1](latents)
